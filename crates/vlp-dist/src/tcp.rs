//! The CPU backend (the role gloo plays for PyTorch): every rank holds one TCP connection
//! to rank 0, which also serves the rendezvous. An exchange sends each rank's bytes to
//! rank 0, which combines them in rank order and sends the one result back to every rank,
//! so every rank ends with the same bits and a run repeats exactly.
//!
//! Each message carries the collective's kind and a sequence number: ranks that call
//! different collectives (a bug, or processes that diverged) get
//! [`DistError::OutOfStep`], never a mix of unrelated data. A closed connection or a
//! silent peer ([`crate::collective_timeout`]) is [`DistError::PeerLost`], naming the rank.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::bucket::reduce_in_buckets;
use crate::error::{DistError, Result};
use crate::host::{add_into, divide, from_bytes, to_bytes};
use crate::world::World;
use crate::{Collective, Reduce};

const HELLO: &[u8; 8] = b"vlp-dist";
const PROTOCOL: u32 = 1;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Welcome = 1,
    Refused = 2,
    AllReduce = 3,
    AllGather = 4,
    Broadcast = 5,
    Bytes = 6,
    Error = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Welcome,
            2 => Kind::Refused,
            3 => Kind::AllReduce,
            4 => Kind::AllGather,
            5 => Kind::Broadcast,
            6 => Kind::Bytes,
            7 => Kind::Error,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Welcome | Kind::Refused => "the rendezvous",
            Kind::AllReduce => "an all-reduce",
            Kind::AllGather => "an all-gather",
            Kind::Broadcast => "a broadcast",
            Kind::Bytes => "an all-gather of bytes",
            Kind::Error => "an error report",
        }
    }
}

/// One message: kind, sequence number, tag (dtype and reduction of an all-reduce), payload.
struct Message {
    kind: Kind,
    seq: u64,
    tag: u64,
    payload: Vec<u8>,
}

/// Largest payload accepted from a peer (a corrupt length must not allocate without bound).
const MAX_PAYLOAD: u64 = 1 << 36;

fn send(stream: &mut TcpStream, m: &Message) -> std::io::Result<()> {
    let mut head = [0u8; 25];
    head[0] = m.kind as u8;
    head[1..9].copy_from_slice(&m.seq.to_le_bytes());
    head[9..17].copy_from_slice(&m.tag.to_le_bytes());
    head[17..25].copy_from_slice(&(m.payload.len() as u64).to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(&m.payload)?;
    stream.flush()
}

fn recv(stream: &mut TcpStream) -> std::io::Result<Message> {
    let mut head = [0u8; 25];
    stream.read_exact(&mut head)?;
    let kind = Kind::from_u8(head[0]).ok_or_else(|| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!("unknown message kind {}", head[0]),
        )
    })?;
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let len = word(17);
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a message of {len} bytes"),
        ));
    }
    let mut payload = Vec::new();
    payload
        .try_reserve_exact(len as usize)
        .map_err(|_| std::io::Error::new(ErrorKind::OutOfMemory, format!("{len} bytes")))?;
    payload.resize(len as usize, 0);
    stream.read_exact(&mut payload)?;
    Ok(Message {
        kind,
        seq: word(1),
        tag: word(9),
        payload,
    })
}

/// What a failed read or write from `peer` means for the run.
fn lost(peer: usize, op: &'static str, e: std::io::Error) -> DistError {
    let what = match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            "closed its connection".to_string()
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "sent nothing for {} s (VLP_COLLECTIVE_TIMEOUT)",
            crate::collective_timeout().as_secs()
        ),
        _ => format!("failed: {e}"),
    };
    DistError::PeerLost { peer, op, what }
}

/// The links of one process: rank 0 holds one per other rank (index `r - 1`), every
/// other rank one to rank 0.
enum Links {
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
}

struct State {
    links: Links,
    seq: u64,
}

/// Processes on CPUs exchanging tensors over TCP through rank 0.
pub struct TcpCollective {
    rank: usize,
    world_size: usize,
    state: Mutex<State>,
}

impl TcpCollective {
    /// Joins the run of `world`: rank 0 listens on [`World::store_addr`]'s port and waits
    /// up to `rendezvous` for every other rank; the others connect (retrying while rank 0
    /// is not up yet). After it, a peer silent for `exchange` is lost.
    pub fn connect(world: &World, rendezvous: Duration, exchange: Duration) -> Result<Self> {
        let links = if world.rank == 0 {
            Links::Root(accept_all(world, rendezvous)?)
        } else {
            Links::Leaf(join(world, rendezvous)?)
        };
        let streams: Vec<&TcpStream> = match &links {
            Links::Root(v) => v.iter().collect(),
            Links::Leaf(s) => vec![s],
        };
        for s in streams {
            s.set_read_timeout(Some(exchange))
                .and_then(|_| s.set_write_timeout(Some(exchange)))
                .map_err(|e| DistError::io("socket timeouts", e))?;
        }
        tracing::info!(
            "rank {} of {}: joined the run at {}",
            world.rank,
            world.world_size,
            world.store_addr()
        );
        Ok(TcpCollective {
            rank: world.rank,
            world_size: world.world_size,
            state: Mutex::new(State { links, seq: 0 }),
        })
    }

    /// One exchange: every rank's `mine` goes to rank 0, which checks that all ranks are
    /// in the same collective (`kind`, sequence number, `tag`), applies `combine` to the
    /// payloads in rank order, and sends the result to every rank.
    fn exchange(
        &self,
        kind: Kind,
        tag: u64,
        mine: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seq += 1;
        let seq = state.seq;
        let op = kind.name();
        match &mut state.links {
            Links::Leaf(stream) => {
                send(
                    stream,
                    &Message {
                        kind,
                        seq,
                        tag,
                        payload: mine,
                    },
                )
                .map_err(|e| lost(0, op, e))?;
                let reply = recv(stream).map_err(|e| lost(0, op, e))?;
                match reply.kind {
                    Kind::Error => Err(DistError::OutOfStep(
                        String::from_utf8_lossy(&reply.payload).into_owned(),
                    )),
                    k if k == kind && reply.seq == seq => Ok(reply.payload),
                    k => Err(DistError::OutOfStep(format!(
                        "rank {} in {op} #{seq} got {} #{} from rank 0",
                        self.rank,
                        k.name(),
                        reply.seq
                    ))),
                }
            }
            Links::Root(streams) => {
                let mut all = Vec::with_capacity(streams.len() + 1);
                all.push(mine);
                let mut mismatch = None;
                for (i, stream) in streams.iter_mut().enumerate() {
                    let m = recv(stream).map_err(|e| lost(i + 1, op, e))?;
                    if mismatch.is_none() && (m.kind != kind || m.seq != seq || m.tag != tag) {
                        mismatch = Some(format!(
                            "rank 0 is in {op} #{seq} (tag {tag:#x}) while rank {} is in {} #{} \
                             (tag {:#x})",
                            i + 1,
                            m.kind.name(),
                            m.seq,
                            m.tag
                        ));
                    }
                    all.push(m.payload);
                }
                let result = match mismatch {
                    Some(why) => Err(DistError::OutOfStep(why)),
                    None => combine(all),
                };
                let reply = match &result {
                    Ok(bytes) => Message {
                        kind,
                        seq,
                        tag,
                        payload: bytes.clone(),
                    },
                    Err(e) => Message {
                        kind: Kind::Error,
                        seq,
                        tag,
                        payload: e.to_string().into_bytes(),
                    },
                };
                for (i, stream) in streams.iter_mut().enumerate() {
                    send(stream, &reply).map_err(|e| lost(i + 1, op, e))?;
                }
                result
            }
        }
    }
}

/// Payloads as one buffer: each one's length, then its bytes.
fn pack(parts: Vec<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(&p);
    }
    out
}

fn unpack(mut bytes: &[u8], n: usize) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let bad = || DistError::OutOfStep("a gathered message is truncated".into());
        let len = bytes.get(..8).ok_or_else(bad)?;
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        let part = bytes.get(8..8 + len).ok_or_else(bad)?;
        out.push(part.to_vec());
        bytes = &bytes[8 + len..];
    }
    Ok(out)
}

fn dtype_code(dtype: DType) -> u64 {
    match dtype {
        DType::U8 => 1,
        DType::U32 => 2,
        DType::I64 => 3,
        DType::BF16 => 4,
        DType::F16 => 5,
        DType::F32 => 6,
        DType::F64 => 7,
        _ => 0,
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, tensors: &mut [Tensor], op: Reduce) -> Result<()> {
        let n = self.world_size;
        reduce_in_buckets(tensors, |flat| {
            let dtype = flat.dtype();
            let tag = dtype_code(dtype) << 8 | (op == Reduce::Mean) as u64;
            let bytes = self.exchange(Kind::AllReduce, tag, to_bytes(&flat)?, |all| {
                let mut it = all.into_iter();
                let mut acc = it.next().expect("rank 0's part");
                for other in it {
                    add_into(&mut acc, &other, dtype)?;
                }
                if op == Reduce::Mean {
                    divide(&mut acc, n, dtype)?;
                }
                Ok(acc)
            })?;
            from_bytes(&bytes, dtype, flat.shape().clone(), flat.device())
        })
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let dims = crate::gather_dims(tensor)?;
        let dtype = tensor.dtype();
        // The tag holds the dtype and the size of one row: ranks must agree on both.
        let row: usize = dims[1..].iter().product();
        let tag = dtype_code(dtype) << 48 | (row as u64 & ((1 << 48) - 1));
        let bytes = self.exchange(Kind::AllGather, tag, to_bytes(tensor)?, |all| {
            Ok(all.concat())
        })?;
        let row_bytes = row * dtype.size_in_bytes();
        if row_bytes == 0 || bytes.len() % row_bytes != 0 {
            return Err(DistError::OutOfStep(format!(
                "gathered {} bytes, not whole rows of {row_bytes}",
                bytes.len()
            )));
        }
        let mut shape = dims;
        shape[0] = bytes.len() / row_bytes;
        from_bytes(&bytes, dtype, shape, tensor.device())
    }

    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<()> {
        for t in tensors.iter_mut() {
            let mine = if self.rank == 0 {
                to_bytes(t)?
            } else {
                Vec::new()
            };
            let tag = dtype_code(t.dtype()) << 48 | (t.elem_count() as u64 & ((1 << 48) - 1));
            let bytes = self.exchange(Kind::Broadcast, tag, mine, |mut all| {
                Ok(std::mem::take(&mut all[0]))
            })?;
            *t = from_bytes(&bytes, t.dtype(), t.shape().clone(), t.device())?;
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let packed = self.exchange(Kind::Bytes, 0, bytes.to_vec(), |all| Ok(pack(all)))?;
        unpack(&packed, self.world_size)
    }
}

/// The hello a rank sends when it connects: protocol, rank, world size.
fn hello(world: &World) -> Vec<u8> {
    let mut out = HELLO.to_vec();
    out.extend_from_slice(&PROTOCOL.to_le_bytes());
    out.extend_from_slice(&(world.rank as u64).to_le_bytes());
    out.extend_from_slice(&(world.world_size as u64).to_le_bytes());
    out
}

/// Rank 0: listens and takes one connection from every other rank.
fn accept_all(world: &World, timeout: Duration) -> Result<Vec<TcpStream>> {
    let port = world.store_port;
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        DistError::io(
            format!(
                "rank 0 cannot listen on port {port} (MASTER_PORT + 1, or VLP_STORE_PORT): is \
                 another run using it? choose another MASTER_PORT"
            ),
            e,
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| DistError::io("rendezvous listener", e))?;
    let n = world.world_size;
    let mut slots: Vec<Option<TcpStream>> = (1..n).map(|_| None).collect();
    let start = Instant::now();
    while slots.iter().any(Option::is_none) {
        if start.elapsed() > timeout {
            let missing: Vec<usize> = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_none())
                .map(|(i, _)| i + 1)
                .collect();
            let err = DistError::Missing {
                addr: world.store_addr(),
                missing,
                world_size: n,
                waited: timeout,
            };
            // The ranks that came learn why the run does not start.
            for s in slots.iter_mut().flatten() {
                let _ = refuse(s, &err.to_string());
            }
            return Err(err);
        }
        let (mut stream, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(DistError::io("rendezvous accept", e)),
        };
        match read_hello(&mut stream, n) {
            Ok(rank) if slots[rank - 1].is_some() => {
                let why =
                    format!("rank {rank} has already joined (two processes with RANK={rank}?)");
                tracing::warn!("rendezvous: {from} refused: {why}");
                let _ = refuse(&mut stream, &why);
            }
            Ok(rank) => slots[rank - 1] = Some(stream),
            Err(why) => {
                tracing::warn!("rendezvous: {from} refused: {why}");
                let _ = refuse(&mut stream, &why);
            }
        }
    }
    let mut streams: Vec<TcpStream> = slots.into_iter().map(|s| s.expect("all joined")).collect();
    for (i, s) in streams.iter_mut().enumerate() {
        send(
            s,
            &Message {
                kind: Kind::Welcome,
                seq: 0,
                tag: n as u64,
                payload: Vec::new(),
            },
        )
        .map_err(|e| lost(i + 1, "the rendezvous", e))?;
    }
    Ok(streams)
}

fn refuse(stream: &mut TcpStream, why: &str) -> std::io::Result<()> {
    send(
        stream,
        &Message {
            kind: Kind::Refused,
            seq: 0,
            tag: 0,
            payload: why.as_bytes().to_vec(),
        },
    )
}

/// A connecting rank's hello: its rank, checked against the world size.
fn read_hello(stream: &mut TcpStream, world_size: usize) -> std::result::Result<usize, String> {
    stream
        .set_nonblocking(false)
        // Short: connections are read one at a time, and a silent one must not hold up the
        // ranks queued behind it for long.
        .and_then(|_| stream.set_read_timeout(Some(Duration::from_secs(2))))
        .and_then(|_| stream.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 28];
    stream
        .read_exact(&mut buf)
        .map_err(|e| format!("no hello: {e}"))?;
    if &buf[..8] != HELLO {
        return Err("not a vlp process".into());
    }
    let protocol = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if protocol != PROTOCOL {
        return Err(format!(
            "protocol {protocol}, rank 0 speaks {PROTOCOL} (mixed vlp versions?)"
        ));
    }
    let rank = u64::from_le_bytes(buf[12..20].try_into().expect("8 bytes")) as usize;
    let size = u64::from_le_bytes(buf[20..28].try_into().expect("8 bytes")) as usize;
    if size != world_size {
        return Err(format!(
            "rank {rank} says WORLD_SIZE={size}, rank 0 has {world_size}"
        ));
    }
    if rank == 0 || rank >= world_size {
        return Err(format!(
            "rank {rank} cannot join a world of {world_size} as a peer"
        ));
    }
    Ok(rank)
}

/// A rank other than 0: connects to rank 0 (retrying until `timeout`), says hello, and
/// waits until every rank has joined.
fn join(world: &World, timeout: Duration) -> Result<TcpStream> {
    let addr = world.store_addr();
    let fail = |reason: String| DistError::Join {
        rank: world.rank,
        addr: addr.clone(),
        reason,
    };
    let start = Instant::now();
    let mut last_error = String::from("no attempt");
    let mut stream = loop {
        if start.elapsed() > timeout {
            return Err(fail(format!(
                "not reachable within {} s ({last_error}); is rank 0 running, and \
                 MASTER_ADDR/MASTER_PORT the same for every process?",
                timeout.as_secs()
            )));
        }
        let targets: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last_error = format!("cannot resolve: {e}");
                Vec::new()
            }
        };
        let mut connected = None;
        for t in &targets {
            match TcpStream::connect_timeout(t, Duration::from_secs(2)) {
                Ok(s) => {
                    connected = Some(s);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        match connected {
            Some(s) => break s,
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream
        .set_nodelay(true)
        .and_then(|_| stream.write_all(&hello(world)))
        .map_err(|e| fail(format!("hello: {e}")))?;
    // Rank 0 answers once everyone is there, or when its own wait ends.
    stream
        .set_read_timeout(Some(timeout + Duration::from_secs(30)))
        .map_err(|e| fail(e.to_string()))?;
    let reply = recv(&mut stream).map_err(|e| fail(format!("no answer from rank 0: {e}")))?;
    match reply.kind {
        Kind::Welcome => Ok(stream),
        Kind::Refused => Err(fail(format!(
            "refused: {}",
            String::from_utf8_lossy(&reply.payload)
        ))),
        k => Err(fail(format!("unexpected {} from rank 0", k.name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::atomic::{AtomicU16, Ordering};

    /// A port for each test's world (tests run in parallel).
    fn port() -> u16 {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let base = 41000 + (std::process::id() % 2000) as u16 * 8;
        base + NEXT.fetch_add(2, Ordering::SeqCst)
    }

    fn world(rank: usize, n: usize, port: u16) -> World {
        World::on_localhost(rank, n, port)
    }

    /// Runs `f` on `n` ranks, one thread each, and returns their results by rank.
    fn on_ranks<T: Send + 'static>(
        n: usize,
        f: impl Fn(TcpCollective) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let p = port();
        let handles: Vec<_> = (0..n)
            .map(|r| {
                std::thread::spawn(move || {
                    let c = TcpCollective::connect(
                        &world(r, n, p),
                        Duration::from_secs(20),
                        Duration::from_secs(20),
                    )
                    .unwrap();
                    f(c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_gather_broadcast_and_bytes_over_three_ranks() {
        let out = on_ranks(3, |c| {
            let r = c.rank() as f32;
            let dev = Device::Cpu;
            let mut ts = vec![
                Tensor::new(&[[r, 1.0], [2.0 * r, 3.0]], &dev).unwrap(),
                Tensor::new(&[r as f64 + 0.5], &dev).unwrap(),
            ];
            c.all_reduce(&mut ts, Reduce::Mean).unwrap();
            let mut sum = vec![Tensor::new(&[r + 1.0], &dev).unwrap()];
            c.all_reduce(&mut sum, Reduce::Sum).unwrap();
            let rows = c.rank() + 1; // ranks may gather different numbers of rows
            let g = c
                .all_gather(&Tensor::full(r, (rows, 2), &dev).unwrap())
                .unwrap();
            let mut b = vec![Tensor::new(&[r + 10.0], &dev).unwrap()];
            c.broadcast(&mut b).unwrap();
            let bytes = c.all_gather_bytes(&vec![c.rank() as u8; c.rank()]).unwrap();
            (
                ts[0].to_vec2::<f32>().unwrap(),
                ts[1].to_vec1::<f64>().unwrap(),
                sum[0].to_vec1::<f32>().unwrap(),
                g.to_vec2::<f32>().unwrap(),
                b[0].to_vec1::<f32>().unwrap(),
                bytes,
            )
        });
        for (a, b, s, g, bc, bytes) in out {
            assert_eq!(a, vec![vec![1.0, 1.0], vec![2.0, 3.0]]);
            assert_eq!(b, vec![1.5]);
            assert_eq!(s, vec![6.0]);
            // Rank-major: rank 0's one row, rank 1's two, rank 2's three.
            let firsts: Vec<f32> = g.iter().map(|row| row[0]).collect();
            assert_eq!(firsts, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            assert_eq!(bc, vec![10.0]);
            assert_eq!(bytes, vec![vec![], vec![1], vec![2, 2]]);
        }
    }

    #[test]
    fn ranks_in_different_collectives_are_out_of_step() {
        let out = on_ranks(2, |c| {
            let dev = Device::Cpu;
            if c.rank() == 0 {
                let mut t = vec![Tensor::new(&[1f32], &dev).unwrap()];
                c.all_reduce(&mut t, Reduce::Mean)
                    .err()
                    .map(|e| e.to_string())
            } else {
                c.all_gather_bytes(b"x").err().map(|e| e.to_string())
            }
        });
        for e in out {
            let e = e.expect("an error on every rank");
            assert!(e.contains("out of step"), "{e}");
        }
        // Same collective, different dtypes: also refused.
        let out = on_ranks(2, |c| {
            let dev = Device::Cpu;
            let t = if c.rank() == 0 {
                Tensor::new(&[1f32], &dev).unwrap()
            } else {
                Tensor::new(&[1f64], &dev).unwrap()
            };
            c.all_reduce(&mut [t], Reduce::Mean).is_err()
        });
        assert_eq!(out, vec![true, true]);
    }

    #[test]
    fn a_missing_rank_is_named_after_the_timeout() {
        let p = port();
        let n = 3;
        // Rank 1 comes, rank 2 never does.
        let one = std::thread::spawn(move || {
            TcpCollective::connect(
                &world(1, n, p),
                Duration::from_secs(1),
                Duration::from_secs(5),
            )
            .err()
            .map(|e| e.to_string())
        });
        let err = TcpCollective::connect(
            &world(0, n, p),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .err()
        .expect("rank 2 never came")
        .to_string();
        assert!(err.contains("rank(s) [2] of 3 did not arrive"), "{err}");
        let one = one.join().unwrap().expect("rank 1 is told");
        assert!(one.contains("rank 1") && one.contains("[2]"), "{one}");
    }

    #[test]
    fn a_rank_without_rank_0_gives_up_with_the_address() {
        let p = port();
        let err = TcpCollective::connect(
            &world(1, 2, p),
            Duration::from_millis(500),
            Duration::from_secs(1),
        )
        .err()
        .expect("nobody listens")
        .to_string();
        assert!(
            err.contains(&format!("127.0.0.1:{p}")) && err.contains("rank 1"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_peer_is_named() {
        let out = on_ranks(2, |c| {
            if c.rank() == 1 {
                drop(c); // the process "dies"
                return None;
            }
            Some(c.all_gather_bytes(b"x").unwrap_err().to_string())
        });
        let e = out[0].clone().unwrap();
        assert!(e.contains("rank 1 closed its connection"), "{e}");
    }

    #[test]
    fn a_stranger_is_refused_and_the_run_goes_on() {
        let p = port();
        let stranger = std::thread::spawn(move || {
            // Speaks something else first; a wrong world size next.
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", p)) {
                let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n........");
            }
            let bad = world(1, 5, p);
            TcpCollective::connect(&bad, Duration::from_secs(5), Duration::from_secs(5))
                .err()
                .map(|e| e.to_string())
        });
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            TcpCollective::connect(
                &world(1, 2, p),
                Duration::from_secs(10),
                Duration::from_secs(5),
            )
            .map(|c| c.all_gather_bytes(&[7]).unwrap())
        });
        let root = TcpCollective::connect(
            &world(0, 2, p),
            Duration::from_secs(10),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(root.all_gather_bytes(&[3]).unwrap(), vec![vec![3], vec![7]]);
        let e = stranger.join().unwrap().expect("refused");
        assert!(e.contains("WORLD_SIZE=5"), "{e}");
        assert_eq!(late.join().unwrap().unwrap(), vec![vec![3], vec![7]]);
    }
}
