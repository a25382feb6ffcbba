//! Who this process is among the processes of a run, read from the environment the
//! launchers set: `vlp launch` and `torchrun` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) or SLURM's `srun` (`SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_JOB_NODELIST`). No variable set: one process.

use std::fmt;

use vlp_core::device::DeviceSpec;

use crate::error::{DistError, Result};

/// The port rank 0 listens on when neither `MASTER_PORT` nor `VLP_STORE_PORT` says (the
/// rendezvous uses `MASTER_PORT + 1`: torchrun's own agent holds `MASTER_PORT`).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The most processes a run may have (a larger `WORLD_SIZE` is refused as a typo).
pub const MAX_WORLD_SIZE: usize = 1 << 16;

/// One process's place in a data-parallel run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// This process's index, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Its index among the processes of its machine (its GPU).
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Where rank 0 runs.
    pub master_addr: String,
    pub master_port: u16,
    /// The port of vlp's rendezvous on `master_addr`: `VLP_STORE_PORT`, else
    /// `master_port + 1`.
    pub store_port: u16,
    /// Which convention the values came from (`torchrun` for `vlp launch` too, `SLURM`).
    pub source: &'static str,
    /// GPUs this process sees, when `CUDA_VISIBLE_DEVICES` says (`srun --gpus-per-task=1`
    /// leaves each process exactly one, which is then its `cuda:0`).
    pub visible_gpus: Option<usize>,
}

impl World {
    /// One process.
    pub fn single() -> Self {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            store_port: DEFAULT_MASTER_PORT + 1,
            source: "single process",
            visible_gpus: None,
        }
    }

    /// Rank `rank` of `world_size` processes on this machine meeting at `store_port`
    /// (processes or threads started by a program itself, such as tests).
    pub fn on_localhost(rank: usize, world_size: usize, store_port: u16) -> Self {
        World {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: "127.0.0.1".into(),
            master_port: store_port.saturating_sub(1),
            store_port,
            source: "this program",
            visible_gpus: None,
        }
    }

    /// This process's world from its environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`World::from_env`] over any source of variables (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |var: &str| -> Result<Option<usize>> {
            get(var)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        DistError::env(var, format!("`{v}` is not a non-negative integer"))
                    })
                })
                .transpose()
        };
        let (rank, world_size, local_rank, local_world_size, source) =
            if get("WORLD_SIZE").is_some() || get("RANK").is_some() {
                let world_size = num("WORLD_SIZE")?.ok_or_else(|| {
                    DistError::env("WORLD_SIZE", "RANK is set but WORLD_SIZE is not")
                })?;
                let rank = num("RANK")?
                    .ok_or_else(|| DistError::env("RANK", "WORLD_SIZE is set but RANK is not"))?;
                let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
                let local_world_size = num("LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
                (rank, world_size, local_rank, local_world_size, "torchrun")
            } else if get("SLURM_PROCID").is_some() && get("SLURM_NTASKS").is_some() {
                let rank = num("SLURM_PROCID")?.expect("checked");
                let world_size = num("SLURM_NTASKS")?.expect("checked");
                let local_rank = num("SLURM_LOCALID")?.unwrap_or(0);
                let local_world_size =
                    match get("SLURM_NTASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE")) {
                        Some(v) => leading_count(&v).ok_or_else(|| {
                            DistError::env("SLURM_TASKS_PER_NODE", format!("cannot read `{v}`"))
                        })?,
                        None => world_size,
                    };
                (rank, world_size, local_rank, local_world_size, "SLURM")
            } else {
                return Ok(Self::single());
            };
        let visible_gpus = get("CUDA_VISIBLE_DEVICES")
            .map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count());
        if world_size == 0 || world_size > MAX_WORLD_SIZE {
            return Err(DistError::env(
                "WORLD_SIZE",
                format!("{world_size} processes (1 to {MAX_WORLD_SIZE})"),
            ));
        }
        if rank >= world_size {
            return Err(DistError::env(
                "RANK",
                format!("rank {rank} is not below the world size {world_size}"),
            ));
        }
        if local_world_size == 0 || local_rank >= local_world_size {
            return Err(DistError::env(
                "LOCAL_RANK",
                format!("local rank {local_rank} of {local_world_size} on this machine"),
            ));
        }
        let master_addr = match get("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if source == "SLURM" => {
                match get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")) {
                    Some(list) => first_host(&list).ok_or_else(|| {
                        DistError::env("SLURM_JOB_NODELIST", format!("no host in `{list}`"))
                    })?,
                    None => "127.0.0.1".to_string(),
                }
            }
            _ if world_size > 1 => {
                return Err(DistError::env(
                    "MASTER_ADDR",
                    "not set: every process needs the address of rank 0's machine",
                ))
            }
            _ => "127.0.0.1".to_string(),
        };
        let port = |var: &str| -> Result<Option<u16>> {
            get(var)
                .map(|v| {
                    v.trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|&p| p > 0)
                        .ok_or_else(|| DistError::env(var, format!("`{v}` is not a port")))
                })
                .transpose()
        };
        let master_port = match port("MASTER_PORT")? {
            Some(p) => p,
            // One port per job, the same on every node: derived from the job id.
            None if source == "SLURM" => match num("SLURM_JOB_ID")? {
                Some(id) => 20000 + (id % 20000) as u16,
                None => DEFAULT_MASTER_PORT,
            },
            None if world_size > 1 && source == "torchrun" => {
                return Err(DistError::env(
                    "MASTER_PORT",
                    "not set: every process needs rank 0's port",
                ))
            }
            None => DEFAULT_MASTER_PORT,
        };
        let store_port = match port("VLP_STORE_PORT")? {
            Some(p) => p,
            None => master_port.checked_add(1).ok_or_else(|| {
                DistError::env(
                    "MASTER_PORT",
                    "65535: the rendezvous needs MASTER_PORT + 1 (or set VLP_STORE_PORT)",
                )
            })?,
        };
        Ok(World {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            store_port,
            source,
            visible_gpus,
        })
    }

    /// Whether more than one process trains.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// The device this process computes on: a GPU request becomes this process's own GPU,
    /// `cuda:LOCAL_RANK` (one process per GPU, as torchrun arranges), or `cuda:0` when
    /// `CUDA_VISIBLE_DEVICES` leaves the process one GPU (`srun --gpus-per-task=1`); the
    /// CPU stays the CPU.
    pub fn device(&self, asked: DeviceSpec) -> DeviceSpec {
        match asked {
            DeviceSpec::Cuda(_) if self.visible_gpus == Some(1) => DeviceSpec::Cuda(0),
            DeviceSpec::Cuda(n) if self.local_world_size > 1 || self.is_distributed() => {
                if n != 0 && n != self.local_rank {
                    tracing::warn!(
                        "rank {}: device cuda:{n} replaced by cuda:{} (LOCAL_RANK); choose \
                         GPUs with CUDA_VISIBLE_DEVICES",
                        self.rank,
                        self.local_rank
                    );
                }
                DeviceSpec::Cuda(self.local_rank)
            }
            other => other,
        }
    }

    /// `MASTER_ADDR:store_port`, where rank 0 listens.
    pub fn store_addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.store_port)
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} of {} (local {} of {}, {})",
            self.rank, self.world_size, self.local_rank, self.local_world_size, self.source
        )
    }
}

/// The count at the start of a SLURM tasks-per-node value: `4`, `4(x2)`, `4(x2),3`.
fn leading_count(v: &str) -> Option<usize> {
    let digits: String = v.trim().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|&n| n > 0)
}

/// The first host of a SLURM node list: `gpu07`, `gpu[07-10,12]`, `a[1-2],b3`,
/// `node[003-004]x` -> `gpu07`, `gpu07`, `a1`, `node003x`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let mut depth = 0usize;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let first = &list[..end];
    let host = match (first.find('['), first.find(']')) {
        (Some(open), Some(close)) if open < close => {
            let inside = &first[open + 1..close];
            let range = inside.split(',').next()?;
            let start = range.split('-').next()?;
            format!("{}{}{}", &first[..open], start, &first[close + 1..])
        }
        (None, None) => first.to_string(),
        _ => return None,
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_variables_is_one_process() {
        let w = world(&[]).unwrap();
        assert_eq!(w, World::single());
        assert!(!w.is_distributed());
        assert_eq!(w.device(DeviceSpec::Cuda(0)), DeviceSpec::Cuda(0));
    }

    #[test]
    fn torchrun_variables() {
        let w = world(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_rank, w.local_world_size),
            (5, 8, 1, 4)
        );
        assert_eq!(w.store_addr(), "node0:29401");
        assert_eq!(w.device(DeviceSpec::Cuda(0)), DeviceSpec::Cuda(1));
        assert_eq!(w.device(DeviceSpec::Cpu), DeviceSpec::Cpu);
        let w = world(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29400"),
            ("VLP_STORE_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!(w.store_addr(), "h:4000");
    }

    #[test]
    fn slurm_variables() {
        let w = world(&[
            ("SLURM_PROCID", "6"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_rank, w.local_world_size),
            (6, 8, 2, 4)
        );
        assert_eq!(w.master_addr, "gpu07");
        assert_eq!(w.device(DeviceSpec::Cuda(0)), DeviceSpec::Cuda(2));
        assert_eq!(w.master_port, 20000 + (123456 % 20000) as u16);
        assert_eq!(w.source, "SLURM");
        // One GPU per task: it is the process's cuda:0.
        let w = world(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "3"),
            ("SLURM_TASKS_PER_NODE", "4"),
            ("CUDA_VISIBLE_DEVICES", "3"),
        ])
        .unwrap();
        assert_eq!(w.device(DeviceSpec::Cuda(0)), DeviceSpec::Cuda(0));
        // torchrun's variables win when both are present (torchrun inside an allocation).
        let w = world(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "x"),
            ("MASTER_PORT", "1000"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.source), (1, "torchrun"));
    }

    #[test]
    fn bad_variables_name_themselves() {
        for (vars, var) in [
            (
                vec![
                    ("RANK", "2"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "1"),
                ],
                "RANK",
            ),
            (vec![("RANK", "0"), ("WORLD_SIZE", "x")], "WORLD_SIZE"),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "18446744073709551615")],
                "WORLD_SIZE",
            ),
            (vec![("RANK", "0")], "WORLD_SIZE"),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
                "MASTER_ADDR",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "65535"),
                ],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "3"),
                    ("LOCAL_WORLD_SIZE", "2"),
                ],
                "LOCAL_RANK",
            ),
        ] {
            let err = world(&vars).unwrap_err().to_string();
            assert!(err.contains(&format!("`{var}`")), "{vars:?}: {err}");
        }
    }

    #[test]
    fn first_hosts_of_node_lists() {
        assert_eq!(first_host("gpu07").as_deref(), Some("gpu07"));
        assert_eq!(first_host("gpu[07-10,12]").as_deref(), Some("gpu07"));
        assert_eq!(first_host("a[1-2],b3").as_deref(), Some("a1"));
        assert_eq!(first_host("b3,a[1-2]").as_deref(), Some("b3"));
        assert_eq!(first_host("node[003-004]x").as_deref(), Some("node003x"));
        assert_eq!(first_host(""), None);
        assert_eq!(first_host("bad[1-2"), None);
    }
}
