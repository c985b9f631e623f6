//! Q4_0 and Q4_1 weights times f32 activations, computed as ggml does:
//! activations rounded to Q8_0 / Q8_1 blocks (scale and block sum rounded to
//! f16 once, as `quantize_row_q8_*` do) and an AVX2 dot product chosen at
//! run time.
//!
//! Why ours and not candle's: candle 0.11 has no SIMD Q4_1 kernel on x86
//! (scalar) and rounds the Q8_1 block sum in f16 arithmetic, which moved
//! logits against llama.cpp's; its Q4_0 mat-vec is 2x slower than this one.
//! Measured in `cargo bench --bench kernels` (1536x1536, 2 threads, AVX-512
//! Xeon): candle Q4_1 535 µs, ours 55 µs; candle Q4_0 119 µs, ours below.

use half::f16;
use rayon::prelude::*;

/// Elements per block.
pub const QK: usize = 32;
/// Bytes per Q4_1 block: f16 d, f16 m, 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;
/// Bytes per Q4_0 block: f16 d, 16 bytes of nibbles.
pub const Q4_0_BYTES: usize = 18;

/// Below this many weights a mat-vec runs on the calling thread.
pub const PARALLEL_MIN_WEIGHTS: usize = 1 << 20;

/// The 4-bit weight formats this kernel handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// d * (q - 8)
    Q4_0,
    /// d * q + m
    Q4_1,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => Q4_0_BYTES,
            Format::Q4_1 => BLOCK_BYTES,
        }
    }
}

/// One activation row as Q8_1 blocks.
struct Q8_1Row {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

fn quantize_q8_1(x: &[f32]) -> Q8_1Row {
    let nb = x.len() / QK;
    let mut r = Q8_1Row {
        qs: vec![0; x.len()],
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
    };
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in r.qs[b * QK..(b + 1) * QK].iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        // ggml stores d and s = sum * d as f16 and reads them back as f32.
        r.d.push(f16::from_f32(d).to_f32());
        r.s.push(f16::from_f32(sum as f32 * d).to_f32());
    }
    r
}

/// f16 -> f32 for every bit pattern, as ggml's table: converting two scales
/// per block per row through `half` cost more than the dot product itself.
fn f16_table() -> &'static [f32] {
    static T: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    T.get_or_init(|| (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect())
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize, table: &[f32]) -> f32 {
    table[u16::from_le_bytes([b[i], b[i + 1]]) as usize]
}

fn dot_scalar(w: &[u8], x: &Q8_1Row) -> f32 {
    let table = f16_table();
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, m) = (f16_at(blk, 0, table), f16_at(blk, 2, table));
        let qs = &blk[4..];
        let xq = &x.qs[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi +=
                (qs[j] & 0x0F) as i32 * xq[j] as i32 + (qs[j] >> 4) as i32 * xq[j + QK / 2] as i32;
        }
        sumf += d * x.d[b] * sumi as f32 + m * x.s[b];
    }
    sumf
}

fn dot_scalar_q4_0(w: &[u8], x: &Q8_1Row) -> f32 {
    let table = f16_table();
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(Q4_0_BYTES).enumerate() {
        let d = f16_at(blk, 0, table);
        let qs = &blk[2..];
        let xq = &x.qs[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += ((qs[j] & 0x0F) as i32 - 8) * xq[j] as i32
                + ((qs[j] >> 4) as i32 - 8) * xq[j + QK / 2] as i32;
        }
        sumf += d * x.d[b] * sumi as f32;
    }
    sumf
}

/// 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..16), then high (16..32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nibbles(p: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let packed = _mm_loadu_si128(p as *const __m128i);
    let bytes =
        _mm256_insertf128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1);
    _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F))
}

/// Sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_q4_0(w: &[u8], x: &Q8_1Row) -> f32 {
    use std::arch::x86_64::*;
    let eight = _mm256_set1_epi8(8);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let table = f16_table();
    for (b, blk) in w.chunks_exact(Q4_0_BYTES).enumerate() {
        let d = f16_at(blk, 0, table);
        let qw = _mm256_sub_epi8(nibbles(blk.as_ptr().add(2)), eight);
        let qx = _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i);
        // Signed x signed via maddubs: |w| as u8 times x with w's sign.
        let ax = _mm256_sign_epi8(qw, qw);
        let sy = _mm256_sign_epi8(qx, qw);
        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[b]), dot, acc);
    }
    hsum(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[u8], x: &Q8_1Row) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let table = f16_table();
    for (b, blk) in w.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, m) = (f16_at(blk, 0, table), f16_at(blk, 2, table));
        summs += m * x.s[b];
        let qw = nibbles(blk.as_ptr().add(4));
        let qx = _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i);
        // u8 * i8 pairs -> i16, then pairs -> i32, then f32.
        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[b]), dot, acc);
    }
    hsum(acc) + summs
}

/// Four activation rows against one weight row: each block's nibbles are
/// unpacked once. Each result is bit-identical to `dot` on that row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(format: Format, w: &[u8], xs: [&Q8_1Row; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let eight = _mm256_set1_epi8(8);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    let table = f16_table();
    for (b, blk) in w.chunks_exact(format.block_bytes()).enumerate() {
        let d = f16_at(blk, 0, table);
        match format {
            Format::Q4_0 => {
                let qw = _mm256_sub_epi8(nibbles(blk.as_ptr().add(2)), eight);
                let ax = _mm256_sign_epi8(qw, qw);
                for r in 0..4 {
                    let qx = _mm256_loadu_si256(xs[r].qs.as_ptr().add(b * QK) as *const __m256i);
                    let sy = _mm256_sign_epi8(qx, qw);
                    let dot =
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs[r].d[b]), dot, acc[r]);
                }
            }
            Format::Q4_1 => {
                let m = f16_at(blk, 2, table);
                let qw = nibbles(blk.as_ptr().add(4));
                for r in 0..4 {
                    summs[r] += m * xs[r].s[b];
                    let qx = _mm256_loadu_si256(xs[r].qs.as_ptr().add(b * QK) as *const __m256i);
                    let dot =
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs[r].d[b]), dot, acc[r]);
                }
            }
        }
    }
    [
        hsum(acc[0]) + summs[0],
        hsum(acc[1]) + summs[1],
        hsum(acc[2]) + summs[2],
        hsum(acc[3]) + summs[3],
    ]
}

fn dot(format: Format, w: &[u8], x: &Q8_1Row, avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: avx2 and fma were detected at run time.
        return unsafe {
            match format {
                Format::Q4_0 => dot_avx2_q4_0(w, x),
                Format::Q4_1 => dot_avx2(w, x),
            }
        };
    }
    let _ = avx2;
    match format {
        Format::Q4_0 => dot_scalar_q4_0(w, x),
        Format::Q4_1 => dot_scalar(w, x),
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// dst[m, n] = lhs[m, k] · Wᵀ, with W's n rows of k values as Q4_1 blocks.
pub fn matmul(
    mkn: (usize, usize, usize),
    lhs: &[f32],
    w: &[u8],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    matmul_4bit(Format::Q4_1, mkn, lhs, w, dst)
}

/// dst[m, n] = lhs[m, k] · Wᵀ, with W's n rows of k values as `format` blocks.
pub fn matmul_4bit(
    format: Format,
    (m, k, n): (usize, usize, usize),
    lhs: &[f32],
    w: &[u8],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    let row_bytes = (k / QK) * format.block_bytes();
    if k % QK != 0 || lhs.len() < m * k || w.len() < n * row_bytes || dst.len() < m * n {
        candle_core::bail!("{format:?} matmul: shapes ({m}, {k}, {n}) do not fit the buffers");
    }
    let xs: Vec<Q8_1Row> = lhs.chunks_exact(k).take(m).map(quantize_q8_1).collect();
    let avx2 = has_avx2();
    if m == 1 {
        let x = &xs[0];
        let rows = |(c, out): (usize, &mut [f32])| {
            for (j, o) in out.iter_mut().enumerate() {
                let row = c * 64 + j;
                *o = dot(format, &w[row * row_bytes..(row + 1) * row_bytes], x, avx2);
            }
        };
        // Waking another thread costs more than a small mat-vec (SmolLM2's
        // 576x576 is ~10 µs): perf showed a third of decode in the scheduler.
        if n * k >= PARALLEL_MIN_WEIGHTS {
            dst[..n].par_chunks_mut(64).enumerate().for_each(rows);
        } else {
            dst[..n].chunks_mut(64).enumerate().for_each(rows);
        }
    } else {
        // Each worker takes output columns and computes them for every lhs row,
        // so a weight row is read once per call.
        let mut cols = vec![0f32; n * m];
        cols.par_chunks_mut(m).enumerate().for_each(|(row, out)| {
            let wr = &w[row * row_bytes..(row + 1) * row_bytes];
            let mut i = 0;
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                while i + 4 <= m {
                    // SAFETY: avx2 and fma were detected at run time.
                    let r = unsafe {
                        dot4_avx2(format, wr, [&xs[i], &xs[i + 1], &xs[i + 2], &xs[i + 3]])
                    };
                    out[i..i + 4].copy_from_slice(&r);
                    i += 4;
                }
            }
            for (o, x) in out[i..].iter_mut().zip(&xs[i..]) {
                *o = dot(format, wr, x, avx2);
            }
        });
        for i in 0..m {
            for j in 0..n {
                dst[i * n + j] = cols[j * m + i];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a Q4_1 row and its exact f32 values.
    fn q4_1_row(seed: u32, blocks: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut vals = Vec::new();
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            s >> 8
        };
        for _ in 0..blocks {
            let d = f16::from_f32((next() % 1000) as f32 * 1e-5);
            let m = f16::from_f32(-((next() % 1000) as f32) * 1e-4);
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&m.to_le_bytes());
            let qs: Vec<u8> = (0..16).map(|_| (next() & 0xFF) as u8).collect();
            let mut block = [0f32; 32];
            for j in 0..16 {
                block[j] = d.to_f32() * (qs[j] & 15) as f32 + m.to_f32();
                block[j + 16] = d.to_f32() * (qs[j] >> 4) as f32 + m.to_f32();
            }
            bytes.extend_from_slice(&qs);
            vals.extend_from_slice(&block);
        }
        (bytes, vals)
    }

    #[test]
    fn avx2_and_scalar_agree_and_approximate_the_exact_product() {
        let k = 32 * 18;
        let (w, wv) = q4_1_row(7, k / 32);
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let q = quantize_q8_1(&x);
        let s = dot_scalar(&w, &q);
        let exact: f64 = wv.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (s as f64 - exact).abs() < 1e-2 * exact.abs().max(1.0),
            "{s} vs {exact}"
        );
        if has_avx2() {
            let v = dot(Format::Q4_1, &w, &q, true);
            assert!((v - s).abs() <= 1e-5 * s.abs().max(1.0), "{v} vs {s}");
        }
        let mut dst = [0f32; 2];
        let w2 = [w.clone(), w.clone()].concat();
        matmul((1, k, 2), &x, &w2, &mut dst).unwrap();
        assert_eq!(dst[0], dst[1]);
        let mut dst3 = [0f32; 4];
        let x2 = [x.clone(), x.iter().map(|v| -v).collect()].concat();
        matmul((2, k, 2), &x2, &w2, &mut dst3).unwrap();
        assert_eq!(dst3[0], dst[0]);
        // Batches of rows (the four-row kernel plus a tail) give each row's
        // single-row result bit for bit, for both formats.
        let rows: Vec<f32> = (0..7)
            .flat_map(|r| x.iter().map(move |v| v * (r as f32 - 3.0) * 0.5))
            .collect();
        for format in [Format::Q4_0, Format::Q4_1] {
            let wf: Vec<u8> = match format {
                Format::Q4_1 => w2.clone(),
                Format::Q4_0 => w2
                    .chunks_exact(BLOCK_BYTES)
                    .flat_map(|b| [&b[0..2], &b[4..]].concat())
                    .collect(),
            };
            let mut batch = vec![0f32; 7 * 2];
            matmul_4bit(format, (7, k, 2), &rows, &wf, &mut batch).unwrap();
            for r in 0..7 {
                let mut one = [0f32; 2];
                matmul_4bit(format, (1, k, 2), &rows[r * k..(r + 1) * k], &wf, &mut one).unwrap();
                assert_eq!(&batch[r * 2..r * 2 + 2], &one, "{format:?} row {r}");
            }
        }
    }

    #[test]
    fn q4_0_avx2_and_scalar_agree_and_approximate_the_exact_product() {
        // Q4_0 blocks from the Q4_1 generator: keep d, drop m.
        let k = 32 * 18;
        let (w1, _) = q4_1_row(11, k / 32);
        let mut w = Vec::new();
        let mut vals = Vec::new();
        for blk in w1.chunks_exact(BLOCK_BYTES) {
            w.extend_from_slice(&blk[0..2]);
            w.extend_from_slice(&blk[4..]);
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let mut block = [0f32; 32];
            for j in 0..16 {
                block[j] = d * ((blk[4 + j] & 15) as f32 - 8.0);
                block[j + 16] = d * ((blk[4 + j] >> 4) as f32 - 8.0);
            }
            vals.extend_from_slice(&block);
        }
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
            .collect();
        let q = quantize_q8_1(&x);
        let s = dot_scalar_q4_0(&w, &q);
        let exact: f64 = vals
            .iter()
            .zip(&x)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        assert!(
            (s as f64 - exact).abs() < 1e-2 * exact.abs().max(1.0),
            "{s} vs {exact}"
        );
        if has_avx2() {
            let v = dot(Format::Q4_0, &w, &q, true);
            assert!((v - s).abs() <= 1e-5 * s.abs().max(1.0), "{v} vs {s}");
        }
    }
}
