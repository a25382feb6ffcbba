//! This process's place among the processes of a run — one, or one of those `vlp launch`,
//! `torchrun` or `srun` started (`vlp_dist::World` reads their variables) — its device
//! (`cuda` becomes `cuda:LOCAL_RANK`) and its collective (chosen by `vlp_dist::open`).

use std::sync::Arc;

use candle_core::Device;
use vlp_core::device::DeviceSpec;
use vlp_dist::{Collective, World};

/// What a command that may run as one of several processes needs.
pub struct Joined {
    pub world: World,
    /// The device asked for, made this process's own.
    pub spec: DeviceSpec,
    pub device: Device,
    pub collective: Arc<dyn Collective>,
}

impl Joined {
    /// Whether this process prints and writes the command's results (rank 0).
    pub fn is_main(&self) -> bool {
        self.world.rank == 0
    }
}

/// Reads the launch environment, opens the device, and meets the other processes.
pub fn join(asked: DeviceSpec) -> anyhow::Result<Joined> {
    let world = World::from_env()?;
    let spec = world.device(asked);
    let device = spec.resolve()?;
    if world.is_distributed() {
        tracing::info!("{world} on {spec}");
    }
    let collective = Arc::from(vlp_dist::open(&world, &device)?);
    Ok(Joined {
        world,
        spec,
        device,
        collective,
    })
}
