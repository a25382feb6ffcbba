//! Reading a checkpoint file into named tensors: safetensors, or a PyTorch zip `.pth`
//! through `candle_core::pickle` (which interprets the pickle's opcodes as data and never
//! runs any of its code).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::Tensor;

use super::ImportError;

/// The kinds of file a checkpoint comes in, told apart by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Safetensors,
    /// PyTorch >= 1.6 `torch.save` (a zip archive holding `data.pkl`).
    TorchZip,
    /// PyTorch's legacy (pre-1.6) pickle-only format.
    TorchLegacy,
}

fn read_head(path: &Path) -> Result<Vec<u8>, ImportError> {
    let mut f = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
    let mut head = Vec::with_capacity(16);
    f.by_ref()
        .take(16)
        .read_to_end(&mut head)
        .map_err(|e| ImportError::io(path, e))?;
    Ok(head)
}

/// Tells the file kind from its first bytes.
pub fn file_kind(path: &Path) -> Result<FileKind, ImportError> {
    let head = read_head(path)?;
    if head.starts_with(b"PK\x03\x04") {
        return Ok(FileKind::TorchZip);
    }
    // A pickle starts with PROTO (0x80) and a protocol number.
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(FileKind::TorchLegacy);
    }
    // safetensors: an 8-byte little-endian header length, then a JSON object.
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(FileKind::Safetensors);
    }
    Err(ImportError::Read {
        path: path.to_owned(),
        message: format!(
            "neither safetensors nor a PyTorch checkpoint (file starts with {:02x?}; {} bytes)",
            &head,
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        ),
    })
}

/// All tensors of a checkpoint, on the CPU, under the file's own names (sorted).
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, ImportError> {
    let read_err = |message: String| ImportError::Read {
        path: path.to_owned(),
        message,
    };
    let mut tensors: Vec<(String, Tensor)> = match file_kind(path)? {
        FileKind::Safetensors => candle_core::safetensors::load(path, &vlp_core::device::host())
            .map_err(|e| read_err(format!("invalid safetensors file: {e}")))?
            .into_iter()
            .collect(),
        FileKind::TorchZip => read_pth(path)?,
        FileKind::TorchLegacy => {
            return Err(read_err(
                "a PyTorch checkpoint in the legacy (pre-1.6) format, which cannot be read \
                 without running its pickle; re-save it with a current PyTorch: \
                 `torch.save(torch.load(path, weights_only=True), new_path)`"
                    .into(),
            ))
        }
    };
    if tensors.is_empty() {
        return Err(read_err("the file holds no tensors".into()));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// A zip `.pth`: the state dict under `model` (ALBEF, DeiT), `state_dict`, or at the top.
fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>, ImportError> {
    let read_err = |message: String| ImportError::Read {
        path: path.to_owned(),
        message,
    };
    // Checked before candle reads the file: it allocates what a storage declares and
    // builds (and later drops, recursively) whatever nesting the pickle describes.
    let entry_sizes = check_zip(path).map_err(read_err)?;
    let mut last_error = String::new();
    for key in [Some("model"), Some("state_dict"), None] {
        match candle_core::pickle::PthTensors::new(path, key) {
            Ok(pth) if !pth.tensor_infos().is_empty() => {
                let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
                names.sort();
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    check_storage(&name, &pth.tensor_infos()[&name], &entry_sizes)
                        .map_err(read_err)?;
                    let tensor = pth.get(&name).map_err(|e| ImportError::Read {
                        path: path.to_owned(),
                        message: format!("tensor `{name}`: {e}"),
                    })?;
                    if let Some(t) = tensor {
                        out.push((name, t));
                    }
                }
                return Ok(out);
            }
            Ok(_) => last_error = format!("no tensors under key {key:?}"),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(ImportError::Read {
        path: path.to_owned(),
        message: format!("not a readable PyTorch zip checkpoint: {last_error}"),
    })
}

/// Nesting depth of pickle objects accepted: a state dict needs about ten; the bound
/// keeps candle's recursive handling of the objects (drop, formatting) off the end of the
/// stack of any thread.
pub(crate) const MAX_PICKLE_DEPTH: usize = 1_000;

/// Pickle objects created (clones through the memo included) accepted: a state dict of a
/// few thousand tensors makes tens of thousands; the bound stops a memo that doubles an
/// object at every step from exhausting memory.
const MAX_PICKLE_OBJECTS: u64 = 10_000_000;

/// Largest `data.pkl` read (real ones are well under a megabyte).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Checks every `data.pkl` of the zip with [`scan_pickle`] and returns the uncompressed
/// size of every entry, for [`check_storage`].
fn check_zip(path: &Path) -> Result<HashMap<String, u64>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| format!("not a readable zip archive: {e}"))?;
    let mut sizes = HashMap::new();
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = entry.name().map_err(|e| format!("zip entry {i}: {e}"))?;
        // What the entry can really hold, not what its header declares: a stored entry
        // no more than its bytes in the file, a deflated one no more than deflate's
        // 1032:1 ceiling — a crafted size cannot pass for data that is not there.
        let stored = entry.compressed_size().min(file_len);
        let holds = match entry.compression() {
            zip::CompressionMethod::Stored => entry.size().min(stored),
            _ => entry.size().min(stored.saturating_mul(1032)),
        };
        sizes.insert(name.to_string(), holds);
    }
    for name in sizes.keys().filter(|n| n.ends_with("data.pkl")) {
        let entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(format!(
                "{name}: {} bytes, more than a checkpoint's pickle ({MAX_PICKLE_BYTES})",
                entry.size()
            ));
        }
        let mut data = Vec::new();
        entry
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut data)
            .map_err(|e| format!("{name}: {e}"))?;
        scan_pickle(&data).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(sizes)
}

/// Errors unless the storage record of tensor `name` holds the bytes its shape needs,
/// before anything of that size is allocated.
fn check_storage(
    name: &str,
    info: &candle_core::pickle::TensorInfo,
    entry_sizes: &HashMap<String, u64>,
) -> Result<(), String> {
    let dtype = info.dtype;
    let needed = info
        .layout
        .dims()
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64))
        .and_then(|n| n.checked_add(info.layout.start_offset() as u64));
    let Some(&actual) = entry_sizes.get(&info.path) else {
        return Err(format!(
            "tensor `{name}`: storage `{}` is not in the archive",
            info.path
        ));
    };
    match needed {
        Some(needed) if needed <= actual => Ok(()),
        _ => Err(format!(
            "tensor `{name}`: shape {:?} of {dtype:?} needs more bytes than storage `{}` \
             holds ({actual}; it declares {} elements)",
            info.layout.dims(),
            info.path,
            info.storage_size
        )),
    }
}

/// Walks a pickle's opcodes without building anything, tracking for each stack item how
/// deep its nesting is and counting the objects candle's unpickler would create; errors
/// when either passes its bound, on an opcode candle does not know, or on a truncated
/// argument (a string longer than the file, say).
pub(crate) fn scan_pickle(data: &[u8]) -> Result<(), String> {
    // A stack item: `None` is a MARK, `Some(depth)` an object.
    let mut stack: Vec<Option<usize>> = Vec::new();
    let mut memo: HashMap<u32, (usize, u64)> = HashMap::new();
    // Objects (as nodes) held by each stack item, for the memo's clones.
    let mut nodes: Vec<u64> = Vec::new();
    let mut created: u64 = 0;
    let mut pos = 0usize;
    fn take<'a>(data: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
        let end = pos.checked_add(n).filter(|&e| e <= data.len());
        let end = end.ok_or_else(|| format!("truncated at byte {pos}"))?;
        let bytes = &data[*pos..end];
        *pos = end;
        Ok(bytes)
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    /// The memo index after BINGET/BINPUT (1 byte) or LONG_BINGET/LONG_BINPUT (4 bytes).
    fn memo_id(data: &[u8], pos: &mut usize, long: bool) -> Result<u32, String> {
        Ok(if long {
            let b = take(data, pos, 4)?;
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        } else {
            u32::from(take(data, pos, 1)?[0])
        })
    }
    fn pop_to_mark(
        stack: &mut Vec<Option<usize>>,
        nodes: &mut Vec<u64>,
        at: usize,
    ) -> Result<Vec<(usize, u64)>, String> {
        let mut items = Vec::new();
        loop {
            let item = stack.pop().ok_or_else(|| format!("no MARK at byte {at}"))?;
            let n = nodes.pop().unwrap_or(0);
            match item {
                None => return Ok(items),
                Some(d) => items.push((d, n)),
            }
        }
    }
    loop {
        let at = pos;
        let op = take(data, &mut pos, 1)?[0];
        // (depth, nodes) of the object this opcode pushes, if it pushes one.
        let pop = |stack: &mut Vec<Option<usize>>, nodes: &mut Vec<u64>| {
            let d = stack
                .pop()
                .ok_or_else(|| format!("empty stack at byte {at}"))?;
            Ok::<_, String>((d.unwrap_or(1), nodes.pop().unwrap_or(1)))
        };
        let pushed: Option<(usize, u64)> = match op {
            0x80 => {
                take(data, &mut pos, 1)?;
                None
            }
            b'c' => {
                for _ in 0..2 {
                    let rest = &data[pos..];
                    let line = rest.iter().position(|&b| b == b'\n');
                    let line = line.ok_or_else(|| format!("truncated at byte {pos}"))?;
                    pos += line + 1;
                }
                Some((1, 1))
            }
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                take(data, &mut pos, n)?;
                Some((1, 1))
            }
            b'X' => {
                let len = u32_at(take(data, &mut pos, 4)?) as usize;
                take(data, &mut pos, len)?;
                Some((1, 1))
            }
            0x8a => {
                let n = take(data, &mut pos, 1)?[0] as usize;
                take(data, &mut pos, n)?;
                Some((1, 1))
            }
            b'N' | 0x88 | 0x89 | b'}' | b'd' | b')' | b']' => Some((1, 1)),
            b'(' => {
                stack.push(None);
                nodes.push(0);
                None
            }
            b'Q' => {
                let (d, n) = pop(&mut stack, &mut nodes)?;
                Some((d + 1, n + 1))
            }
            0x85..=0x87 | b't' | b'b' | b'R' | 0x81 => {
                let mut children = Vec::new();
                match op {
                    0x85..=0x87 => {
                        for _ in 0..(op - 0x84) {
                            children.push(pop(&mut stack, &mut nodes)?);
                        }
                    }
                    b't' => children = pop_to_mark(&mut stack, &mut nodes, at)?,
                    _ => {
                        children.push(pop(&mut stack, &mut nodes)?);
                        children.push(pop(&mut stack, &mut nodes)?);
                    }
                }
                let depth = children.iter().map(|c| c.0).max().unwrap_or(0);
                let n: u64 = children.iter().map(|c| c.1).sum();
                Some((depth + 1, n + 1))
            }
            b'a' | b'e' | b'u' | b's' => {
                let mut children = Vec::new();
                match op {
                    b'a' => children.push(pop(&mut stack, &mut nodes)?),
                    b's' => {
                        children.push(pop(&mut stack, &mut nodes)?);
                        children.push(pop(&mut stack, &mut nodes)?);
                    }
                    _ => children = pop_to_mark(&mut stack, &mut nodes, at)?,
                }
                // Added to the container below them, which grows by their depth.
                let (depth, n) = pop(&mut stack, &mut nodes)?;
                let inner = children.iter().map(|c| c.0).max().unwrap_or(0);
                let added: u64 = children.iter().map(|c| c.1).sum();
                stack.push(Some(depth.max(inner + 1)));
                nodes.push(n + added);
                None
            }
            b'h' | b'j' => {
                let id = memo_id(data, &mut pos, op == b'j')?;
                // candle clones the memo's object onto the stack.
                let (d, n) = memo.get(&id).copied().unwrap_or((1, 1));
                created = created.saturating_add(n);
                stack.push(Some(d));
                nodes.push(n);
                None
            }
            b'q' | b'r' => {
                let id = memo_id(data, &mut pos, op == b'r')?;
                // candle stores a clone of the top of the stack.
                let d = stack.last().copied().flatten().unwrap_or(1);
                let n = nodes.last().copied().unwrap_or(1);
                created = created.saturating_add(n);
                memo.insert(id, (d, n));
                None
            }
            b'.' => return Ok(()),
            other => {
                return Err(format!(
                    "unsupported pickle opcode {other:#04x} at byte {at}"
                ))
            }
        };
        if let Some((d, n)) = pushed {
            stack.push(Some(d));
            nodes.push(n);
            created = created.saturating_add(1);
        }
        if stack.last().copied().flatten().unwrap_or(0) > MAX_PICKLE_DEPTH {
            return Err(format!(
                "objects nested more than {MAX_PICKLE_DEPTH} deep (at byte {at}); \
                 not a checkpoint"
            ));
        }
        if created > MAX_PICKLE_OBJECTS {
            return Err(format!(
                "more than {MAX_PICKLE_OBJECTS} objects (at byte {at}); not a checkpoint"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A `torch.save`-style zip: `archive/data.pkl` and the storage records.
    fn write_pth(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
        let file = std::fs::File::create(path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).unwrap();
        zip.write_all(pickle).unwrap();
        for (name, data) in storages {
            zip.start_file(format!("archive/data/{name}"), stored)
                .unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }

    fn int(p: &mut Vec<u8>, v: i32) {
        p.push(b'J');
        p.extend(v.to_le_bytes());
    }

    /// `{"w": _rebuild_tensor_v2(FloatStorage "0" of `storage_len`, 0, shape, contiguous)}`.
    fn state_dict_pickle(storage_len: u64, shape: &[i32]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}'];
        unicode(&mut p, "w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        unicode(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut p, "0");
        unicode(&mut p, "cpu");
        p.extend([0x8a, 8]);
        p.extend(storage_len.to_le_bytes());
        p.extend(b"tQ");
        int(&mut p, 0);
        p.push(b'(');
        for &d in shape {
            int(&mut p, d);
        }
        p.push(b't');
        p.push(b'(');
        let mut stride = 1i32;
        let mut strides = Vec::new();
        for &d in shape.iter().rev() {
            strides.push(stride);
            stride = stride.wrapping_mul(d);
        }
        for &st in strides.iter().rev() {
            int(&mut p, st);
        }
        p.push(b't');
        p.extend([0x89, b'}', b't', b'R', b's', b'.']);
        p
    }

    #[test]
    fn a_well_formed_pth_fixture_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.pth");
        let data: Vec<u8> = [1f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write_pth(&path, &state_dict_pickle(4, &[2, 2]), &[("0", data)]);
        let tensors = read_tensors(&path).unwrap();
        assert_eq!(tensors.len(), 1);
        assert_eq!(tensors[0].0, "w");
        assert_eq!(
            tensors[0]
                .1
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn a_storage_declaring_more_than_its_record_holds_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.pth");
        // 2^40 f32 elements (4 TiB) declared over a 16-byte record.
        let pickle = state_dict_pickle(1 << 40, &[1 << 20, 1 << 20]);
        write_pth(&path, &pickle, &[("0", vec![0u8; 16])]);
        let err = read_tensors(&path).unwrap_err().to_string();
        assert!(err.contains("huge.pth"), "{err}");
        assert!(err.contains("tensor `w`"), "{err}");
        assert!(err.contains("archive/data/0"), "{err}");
        assert!(err.contains("1099511627776 elements"), "{err}");
    }

    #[test]
    fn a_pickle_nested_a_million_deep_is_refused_without_overflowing_the_stack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep.pth");
        // One empty list wrapped in a million 1-tuples.
        let mut pickle = vec![0x80, 2, b']'];
        pickle.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        pickle.push(b'.');
        write_pth(&path, &pickle, &[]);
        let err = read_tensors(&path).unwrap_err().to_string();
        assert!(err.contains("deep.pth"), "{err}");
        assert!(err.contains("nested more than 1000 deep"), "{err}");
    }

    #[test]
    fn a_memo_that_doubles_an_object_is_refused() {
        let mut pickle = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            pickle.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        pickle.push(b'.');
        let err = scan_pickle(&pickle).unwrap_err();
        assert!(err.contains("objects"), "{err}");
    }

    #[test]
    fn no_code_from_a_pickle_runs() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let path = dir.path().join("evil.pth");
        // {"w": os.system("touch <marker>")}, and the same call at the top level.
        let mut call = b"cos\nsystem\n".to_vec();
        unicode(&mut call, &format!("touch {}", marker.display()));
        call.extend([0x85, b'R']);
        let mut pickle = vec![0x80, 2, b'}'];
        unicode(&mut pickle, "w");
        pickle.extend(&call);
        pickle.extend([b's', b'.']);
        write_pth(&path, &pickle, &[]);
        assert!(read_tensors(&path).is_err());
        let mut top = vec![0x80, 2];
        top.extend(&call);
        top.push(b'.');
        write_pth(&path, &top, &[]);
        assert!(read_tensors(&path).is_err());
        assert!(!marker.exists(), "a pickle's code ran");
    }
}
