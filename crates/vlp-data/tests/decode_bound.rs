//! What decoding an image may allocate, measured by a counting allocator (hence a test
//! binary of its own, with one test, so nothing else allocates meanwhile): an 8x8 PNG
//! whose ICC profile inflates to 1 GiB stays within what its size allows, on the path of
//! the shard writer (header check, then decode) and of the loader and eval (decode).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use vlp_data::image_ops::{checked_dimensions, decode_alloc_limit, decode_rgb};
use vlp_data::ingest::{prepare_image, EncodeOptions};

mod common;

/// The system allocator, keeping the bytes live now and the most live since a reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `f`'s result and the most bytes it had allocated at once.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = f();
    (out, (PEAK.load(Ordering::SeqCst) - before) as u64)
}

/// Bits written from the least significant, as deflate packs them.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u64, n: u32) {
        self.acc |= value << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, whose bits deflate stores from the most significant.
    fn code(&mut self, code: u64, n: u32) {
        self.put(code.reverse_bits() >> (64 - n), n);
    }
}

/// A zlib stream of `1 + 258 * copies` zero bytes, 13 bits per 258 of them: one block of
/// deflate's fixed codes, a literal 0 then `copies` times "258 bytes from distance 1".
fn zlib_zeros(copies: u64) -> Vec<u8> {
    let mut bits = Bits::default();
    bits.put(1, 1); // the last block
    bits.put(1, 2); // fixed Huffman codes
    bits.code(0x30, 8); // literal 0
    for _ in 0..copies {
        bits.code(0xC5, 8); // length symbol 285: 258 bytes
        bits.code(0, 5); // distance symbol 0: distance 1
    }
    bits.code(0, 7); // end of block
    bits.put(0, 7); // to a byte boundary
    let mut out = vec![0x78, 0x01];
    out.extend(&bits.out);
    // Adler-32 of zeros: a stays 1, b adds 1 per byte.
    let b = (1 + 258 * copies) % 65521;
    out.extend(((b << 16) as u32 | 1).to_be_bytes());
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|n| (0..8).fold(n, |c, _| (c >> 1) ^ (0xEDB8_8320 * (c & 1))))
        .collect();
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// `png` with an iCCP chunk of `profile` (a zlib stream) right after its IHDR.
fn with_icc_profile(png: &[u8], profile: &[u8]) -> Vec<u8> {
    let ihdr_end = 8 + 4 + 4 + 13 + 4;
    let mut data = b"iCCP".to_vec();
    data.extend(b"bomb\0\0");
    data.extend(profile);
    let mut out = png[..ihdr_end].to_vec();
    out.extend((data.len() as u32 - 4).to_be_bytes());
    out.extend(&data);
    out.extend(crc32(&data).to_be_bytes());
    out.extend(&png[ihdr_end..]);
    out
}

#[test]
fn a_png_whose_icc_profile_inflates_to_a_gib_is_decoded_within_its_allocation_limit() {
    let png = common::png(8, 8, 3);
    let copies = (1u64 << 30) / 258;
    let bomb = with_icc_profile(&png, &zlib_zeros(copies));
    assert!(bomb.len() < 8 << 20, "{} bytes", bomb.len());
    let max_pixels = vlp_core::MAX_IMAGE_PIXELS;
    let limit = decode_alloc_limit(8, 8);
    // The decoder counts what it allocates against the limit, but a buffer it grows may
    // double past its count once; the input is copied into its chunk buffer.
    let allowed = 2 * limit + bomb.len() as u64;

    let (dims, peak) = peak_of(|| checked_dimensions(&bomb, max_pixels));
    assert_eq!(dims, Ok((8, 8)));
    assert!(peak < 1 << 20, "reading the header allocated {peak} bytes");

    let (img, peak) = peak_of(|| decode_rgb(&bomb, max_pixels));
    assert!(
        peak <= allowed,
        "decoding allocated {peak} bytes, more than {allowed}"
    );
    // The profile is dropped (vlp ignores ICC profiles); the pixels are the image's.
    assert_eq!(img.unwrap(), decode_rgb(&png, max_pixels).unwrap());

    // The shard writer checks the header, then decodes a kept image once.
    let (kept, peak) =
        peak_of(|| prepare_image(bomb.clone(), "bomb.png", &EncodeOptions::default()));
    assert!(
        peak <= allowed + bomb.len() as u64,
        "the shard writer allocated {peak} bytes"
    );
    assert_eq!(kept.unwrap().0, "png");
}
