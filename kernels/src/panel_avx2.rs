//! Prefill (several activation rows) for every quantized type, on AVX2 and,
//! where the CPU has it, AVX-512 VNNI.
//!
//! Eight weight rows are unpacked once into a panel of 8-bit codes,
//! interleaved four columns at a time: one 32-byte vector holds four codes
//! of each of the eight rows, so one multiply-add against four activation
//! codes broadcast to every lane (`vpdpbusd`, or `vpmaddubsw` + `vpmaddwd`
//! without VNNI) advances eight dot products at once and leaves each in its
//! own lane: no horizontal sums, and the eight results of an activation row
//! are one contiguous store. The panel covers at most [`KC`] columns, so it
//! stays in L1 while every activation row passes over it; longer rows are
//! done in chunks that continue the same f32 accumulators through `out`.
//!
//! Every type is brought to one shape, groups of G (16 or 32) columns of
//! unsigned codes `u`. The integer dot product of a group is exact. For the
//! 32-weight types, `w = ws[g] (u - OFF) - wm[g]`: the offset comes back out
//! with the activation's code sum, in integers, and the group's f32 scales
//! meet the sum per block, as ggml's vec_dot kernels do. For the K-quants,
//! as ggml does too, the group sums are multiplied by the integer sub-block
//! scales and summed over the super-block (likewise the minimums, or the
//! offset times the scale, with the activation's group sums), and only then
//! scaled by the super-block's f32 `d` (and `dmin`). Products agree with
//! ggml's within f32 rounding, not bit for bit (the order of the f32 sums
//! differs).
//!
//! Each output element has its own lane and sees the same operations in the
//! same order wherever its row falls in a panel and however many activation
//! rows there are (beyond the panel threshold), so the result does not
//! depend on how the runtime splits rows between threads.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

use crate::blocks::QK_K;
use crate::{ActBuf, Out, WType, Weights};

/// Weight rows per panel (the lanes of a vector of i32).
const NR: usize = 8;
/// Activation rows per micro-tile.
const MR: usize = 4;
/// Columns per panel: 8 rows x 2048 codes (16 KiB) plus their group scales
/// (8 KiB at G = 16) fit L1 beside four activation rows.
pub(crate) const KC: usize = 2048;
/// Activation rows from which the panel path pays for its unpacking.
pub(crate) const MIN_ROWS: usize = 4;

use crate::code::{block_len, has_min, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0};
use crate::kquants::group_len;

/// Whether the panel keeps Q8_0's codes signed: without VNNI, unsigned
/// codes up to 255 times activations would overflow maddubs' 16-bit pair
/// sums, so AVX2 uses the sign trick there (|w| times x with w's sign).
const fn signed(t: u8, vnni: bool) -> bool {
    t == Q8_0 && !vnni
}

/// The offset of the unsigned codes.
const fn offset(t: u8, vnni: bool) -> i32 {
    match t {
        Q4_0 => 8,
        Q5_0 => 16,
        Q8_0 if vnni => 128,
        Q3K => 4,
        Q6K => 32,
        _ => 0,
    }
}

/// Eight weight rows of up to [`KC`] columns, unpacked.
#[repr(C, align(32))]
struct Panel {
    /// Quad q (columns 4q..4q+4) at bytes 32q..32q+32, row r's four codes at 32q + 4r.
    codes: [u8; NR * KC],
    /// Group g's scales at 8g..8g+8, one lane per row.
    ws: [f32; NR * KC / 16],
    /// Group g's minimums, likewise (32-weight types with minimums only).
    wm: [f32; NR * KC / 16],
    /// K-quants: group g's integer scale, one lane per row.
    isc: [i32; NR * KC / 16],
    /// K-quants: what group g's activation code sum is multiplied by (the
    /// integer minimum, or the offset times the scale).
    imn: [i32; NR * KC / 16],
    /// K-quants: super-block s's scale at 8s..8s+8.
    d: [f32; NR * KC / QK_K],
    /// K-quants: super-block s's scale of `imn` (dmin, or d for offsets).
    dm: [f32; NR * KC / QK_K],
}

/// See [`crate::gemm`], for `acts.rows() >= MIN_ROWS` and a quantized type.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with AVX2, FMA and F16C (and AVX-512 F, BW,
/// VL and VNNI when `vnni`).
pub(crate) unsafe fn gemm_avx2_panel(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm(w, rows, acts, out, false)
}

/// [`gemm_avx2_panel`] with AVX-512 VNNI.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI.
pub(crate) unsafe fn gemm_vnni_panel(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm(w, rows, acts, out, true)
}

unsafe fn gemm(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out, vnni: bool) {
    macro_rules! by_type {
        ($f:ident) => {
            match w.wtype {
                WType::Q4_0 => $f::<Q4_0>(w, rows, acts, out),
                WType::Q4_1 => $f::<Q4_1>(w, rows, acts, out),
                WType::Q5_0 => $f::<Q5_0>(w, rows, acts, out),
                WType::Q5_1 => $f::<Q5_1>(w, rows, acts, out),
                WType::Q8_0 => $f::<Q8_0>(w, rows, acts, out),
                WType::Q2K => $f::<Q2K>(w, rows, acts, out),
                WType::Q3K => $f::<Q3K>(w, rows, acts, out),
                WType::Q4K => $f::<Q4K>(w, rows, acts, out),
                WType::Q5K => $f::<Q5K>(w, rows, acts, out),
                WType::Q6K => $f::<Q6K>(w, rows, acts, out),
                t => unreachable!("{t:?} has no panel kernel"),
            }
        };
    }
    if vnni {
        by_type!(gemm_vnni)
    } else {
        by_type!(gemm_avx2)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_avx2<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm_t::<T, false>(w, rows, acts, out)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm_vnni<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm_t::<T, true>(w, rows, acts, out)
}

/// Where activation row `i`'s blocks start, and its Q8_0 block sums.
struct ActRow {
    blocks: *const u8,
    sums: *const i32,
}

// The body is inlined into the two entry points above, so each is compiled
// for its own instruction set (the intrinsics inline into their callers).
#[inline(always)]
unsafe fn gemm_t<const T: u8, const VNNI: bool>(
    w: &Weights,
    rows: Range<usize>,
    acts: &ActBuf,
    out: Out,
) {
    let m = acts.rows();
    let row = |i: usize| -> ActRow {
        match T {
            Q4_0 | Q5_0 | Q8_0 => ActRow {
                blocks: acts.q8_0_row(i).as_ptr() as *const u8,
                sums: acts.q8_0_sums(i).as_ptr(),
            },
            Q4_1 | Q5_1 => ActRow {
                blocks: acts.q8_1_row(i).as_ptr() as *const u8,
                sums: std::ptr::null(),
            },
            _ => ActRow {
                blocks: acts.q8k_row(i).as_ptr() as *const u8,
                sums: std::ptr::null(),
            },
        }
    };
    let bb = w.wtype.block_bytes();
    let mut panel = MaybeUninit::<Panel>::uninit();
    let panel = panel.as_mut_ptr();
    let mut r0 = rows.start;
    while r0 < rows.end {
        let nr = (rows.end - r0).min(NR);
        let mut c0 = 0;
        while c0 < w.k {
            let kc = (w.k - c0).min(KC);
            for r in 0..NR {
                if r < nr {
                    let (start, stride) = w.locate(r0 + r);
                    let src = w.bytes.as_ptr().add(start + c0 / block_len(T) * stride);
                    pack::<T, VNNI>(src, bb, stride, kc, panel, r);
                } else {
                    clear(kc / group_len(T), kc, panel, r);
                }
            }
            let first = c0 == 0;
            let mut i0 = 0;
            while i0 < m {
                let mr = (m - i0).min(MR);
                let dst = |j: usize| out.ptr.add((i0 + j) * out.ld + r0);
                macro_rules! tile_of {
                    ($n:literal) => {
                        tile::<T, VNNI, $n>(
                            &*panel,
                            c0,
                            kc,
                            std::array::from_fn(|j| row(i0 + j)),
                            std::array::from_fn(dst),
                            nr,
                            first,
                        )
                    };
                }
                match mr {
                    4 => tile_of!(4),
                    3 => tile_of!(3),
                    2 => tile_of!(2),
                    _ => tile_of!(1),
                }
                i0 += mr;
            }
            c0 += kc;
        }
        r0 += nr;
    }
}

/// Zero lane `r` of the panel (a row past the end of the range).
#[inline(always)]
unsafe fn clear(ng: usize, kc: usize, p: *mut Panel, r: usize) {
    let codes = (*p).codes.as_mut_ptr() as *mut u32;
    for q in 0..kc / 4 {
        *codes.add(q * NR + r) = 0;
    }
    for g in 0..ng {
        (*p).ws[g * NR + r] = 0.0;
        (*p).wm[g * NR + r] = 0.0;
        (*p).isc[g * NR + r] = 0;
        (*p).imn[g * NR + r] = 0;
    }
    for sb in 0..kc / QK_K {
        (*p).d[sb * NR + r] = 0.0;
        (*p).dm[sb * NR + r] = 0.0;
    }
}

/// The f16 at `p`.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    half::f16::from_bits((p as *const u16).read_unaligned()).to_f32()
}

/// Store 32 codes of row `r` (columns 32c..32c+32 of the panel).
#[inline(always)]
unsafe fn put(p: *mut Panel, r: usize, c: usize, v: __m256i) {
    let mut tmp = [0u32; 8];
    _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, v);
    let codes = (*p).codes.as_mut_ptr() as *mut u32;
    for (j, &t) in tmp.iter().enumerate() {
        *codes.add((8 * c + j) * NR + r) = t;
    }
}

/// Unpack `kc` columns of one weight row (blocks of `bb` bytes, `stride`
/// apart, from `src`) into lane `r`.
#[inline(always)]
unsafe fn pack<const T: u8, const VNNI: bool>(
    src: *const u8,
    bb: usize,
    stride: usize,
    kc: usize,
    p: *mut Panel,
    r: usize,
) {
    let ws = (*p).ws.as_mut_ptr();
    let wm = (*p).wm.as_mut_ptr();
    let set = |g: usize, s: f32, m: f32| {
        *ws.add(g * NR + r) = s;
        *wm.add(g * NR + r) = m;
    };
    if block_len(T) == 32 {
        for b in 0..kc / 32 {
            let blk = src.add(b * stride);
            let v = match T {
                Q4_0 => crate::legacy_avx2::codes::<Q4_0>(blk),
                Q4_1 => crate::legacy_avx2::codes::<Q4_1>(blk),
                Q5_0 => crate::legacy_avx2::codes::<Q5_0>(blk),
                Q5_1 => crate::legacy_avx2::codes::<Q5_1>(blk),
                _ => {
                    let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    if signed(T, VNNI) {
                        q
                    } else {
                        _mm256_xor_si256(q, _mm256_set1_epi8(-128))
                    }
                }
            };
            put(p, r, b, v);
            // w = d q + m: the minimum is added, so it is stored negated.
            let m = if has_min(T) { -f16_at(blk.add(2)) } else { 0.0 };
            set(b, f16_at(blk), m);
        }
        return;
    }
    use crate::kquants_avx2 as k;
    for b in 0..kc / QK_K {
        let blk = src.add(b * stride);
        let u = match T {
            Q2K => k::unpack::<Q2K>(blk),
            Q3K => k::unpack::<Q3K>(blk),
            Q4K => k::unpack::<Q4K>(blk),
            Q5K => k::unpack::<Q5K>(blk),
            _ => k::unpack::<Q6K>(blk),
        };
        for (c, &v) in u.q.iter().enumerate() {
            put(p, r, 8 * b + c, v);
        }
        let bytes = std::slice::from_raw_parts(blk, bb);
        let isc = (*p).isc.as_mut_ptr();
        let imn = (*p).imn.as_mut_ptr();
        let set = |g: usize, sc: i32, mn: i32| {
            *isc.add(g * NR + r) = sc;
            *imn.add(g * NR + r) = mn;
        };
        // Offset types fold the offset into `imn` (off x sc), scaled by d.
        let dm = if has_min(T) { u.dmin } else { u.d };
        (*p).d[b * NR + r] = u.d;
        (*p).dm[b * NR + r] = dm;
        match T {
            Q4K | Q5K => {
                for j in 0..8 {
                    let (sc, mn) = crate::kquants::scale_min_k4(j, &bytes[4..16]);
                    set(8 * b + j, sc as i32, mn as i32);
                }
            }
            Q2K => {
                for (j, &s) in bytes[..16].iter().enumerate() {
                    set(16 * b + j, (s & 0xF) as i32, (s >> 4) as i32);
                }
            }
            Q3K => {
                let s = crate::kquants::q3k_scales(&bytes[96..108]);
                for (j, &s) in s.iter().enumerate() {
                    let sc = s as i32 - 32;
                    set(16 * b + j, sc, 4 * sc);
                }
            }
            _ => {
                for (j, &s) in bytes[192..208].iter().enumerate() {
                    let sc = s as i8 as i32;
                    set(16 * b + j, sc, 32 * sc);
                }
            }
        }
    }
}

/// Activation row `a`'s codes of group `g` (global column index `g * G`),
/// its scale, and the code sum the offset or minimum needs.
#[inline(always)]
unsafe fn act_group<const T: u8>(a: &ActRow, g: usize) -> (*const u8, f32, i32, f32) {
    let gl = group_len(T);
    match T {
        Q4_0 | Q5_0 | Q8_0 => {
            let blk = a.blocks.add(36 * g);
            (blk.add(4), *(blk as *const f32), *a.sums.add(g), 0.0)
        }
        Q4_1 | Q5_1 => {
            let blk = a.blocks.add(40 * g);
            (
                blk.add(8),
                *(blk as *const f32),
                0,
                *(blk.add(4) as *const f32),
            )
        }
        _ => {
            let per = QK_K / gl;
            let blk = a
                .blocks
                .add(std::mem::size_of::<crate::act::ActQ8K>() * (g / per));
            let j = g % per;
            let bsums = blk.add(4 + QK_K) as *const i16;
            let isum = if gl == 16 {
                *bsums.add(j) as i32
            } else {
                *bsums.add(2 * j) as i32 + *bsums.add(2 * j + 1) as i32
            };
            let d = *(blk as *const f32);
            (blk.add(4 + gl * j), d, isum, d * isum as f32)
        }
    }
}

/// Activation rows `a` against the panel's eight rows, columns `c0..c0 + kc`:
/// `dst[i][0..nr]` gets the products (added to what they hold unless `first`).
#[inline(always)]
unsafe fn tile<const T: u8, const VNNI: bool, const M: usize>(
    p: &Panel,
    c0: usize,
    kc: usize,
    a: [ActRow; M],
    dst: [*mut f32; M],
    nr: usize,
    first: bool,
) {
    let gl = group_len(T);
    let off = offset(T, VNNI);
    let mut acc = [_mm256_setzero_ps(); M];
    if !first {
        for i in 0..M {
            acc[i] = load_lanes(dst[i], nr);
        }
    }
    let g0 = c0 / gl;
    if T >= Q2K {
        // ggml's order: integer group sums times integer scales summed over
        // the super-block, then scaled once (exact until that multiply).
        let per = QK_K / gl;
        for sb in 0..kc / QK_K {
            let mut iacc = [_mm256_setzero_si256(); M];
            let mut macc = [_mm256_setzero_si256(); M];
            let mut da = [0f32; M];
            for g in sb * per..(sb + 1) * per {
                let (ia, groups) = group_dot::<T, VNNI, M>(p, &a, g0 + g, g);
                let scv = _mm256_load_si256(p.isc.as_ptr().add(g * NR) as *const __m256i);
                let mnv = _mm256_load_si256(p.imn.as_ptr().add(g * NR) as *const __m256i);
                for i in 0..M {
                    let (_, d, isum, _) = groups[i];
                    da[i] = d;
                    iacc[i] = _mm256_add_epi32(iacc[i], _mm256_mullo_epi32(ia[i], scv));
                    macc[i] =
                        _mm256_add_epi32(macc[i], _mm256_mullo_epi32(mnv, _mm256_set1_epi32(isum)));
                }
            }
            let dv = _mm256_load_ps(p.d.as_ptr().add(sb * NR));
            let dmv = _mm256_load_ps(p.dm.as_ptr().add(sb * NR));
            for i in 0..M {
                let dav = _mm256_set1_ps(da[i]);
                if has_min(T) {
                    let v = _mm256_cvtepi32_ps(iacc[i]);
                    acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dv, dav), v, acc[i]);
                    let m = _mm256_cvtepi32_ps(macc[i]);
                    acc[i] = _mm256_fnmadd_ps(_mm256_mul_ps(dmv, dav), m, acc[i]);
                } else {
                    let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(iacc[i], macc[i]));
                    acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dv, dav), v, acc[i]);
                }
            }
        }
    } else {
        for g in 0..kc / gl {
            let (ia, groups) = group_dot::<T, VNNI, M>(p, &a, g0 + g, g);
            let wsv = _mm256_load_ps(p.ws.as_ptr().add(g * NR));
            let wmv = if has_min(T) {
                _mm256_load_ps(p.wm.as_ptr().add(g * NR))
            } else {
                _mm256_setzero_ps()
            };
            for i in 0..M {
                let (_, da, isum, s) = groups[i];
                let mut v = ia[i];
                if off != 0 {
                    v = _mm256_sub_epi32(v, _mm256_set1_epi32(off * isum));
                }
                let scale = _mm256_mul_ps(wsv, _mm256_set1_ps(da));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), scale, acc[i]);
                if has_min(T) {
                    acc[i] = _mm256_fnmadd_ps(wmv, _mm256_set1_ps(s), acc[i]);
                }
            }
        }
    }
    for i in 0..M {
        store_lanes(dst[i], nr, acc[i]);
    }
}

/// The integer dot products of panel group `g` (activation group `ga`)
/// with each activation row, one lane per weight row, and the rows' group data.
#[inline(always)]
#[allow(clippy::type_complexity)]
unsafe fn group_dot<const T: u8, const VNNI: bool, const M: usize>(
    p: &Panel,
    a: &[ActRow; M],
    ga: usize,
    g: usize,
) -> ([__m256i; M], [(*const u8, f32, i32, f32); M]) {
    let gl = group_len(T);
    let ones = _mm256_set1_epi16(1);
    let mut groups = [(std::ptr::null(), 0f32, 0i32, 0f32); M];
    for i in 0..M {
        groups[i] = act_group::<T>(&a[i], ga);
    }
    let mut ia = [_mm256_setzero_si256(); M];
    let cw = p.codes.as_ptr().add(g * gl * NR);
    for q in 0..gl / 4 {
        let wv = _mm256_load_si256(cw.add(32 * q) as *const __m256i);
        let wabs = if signed(T, VNNI) {
            _mm256_sign_epi8(wv, wv)
        } else {
            wv
        };
        for i in 0..M {
            let x = _mm256_set1_epi32((groups[i].0.add(4 * q) as *const i32).read_unaligned());
            ia[i] = if VNNI {
                _mm256_dpbusd_epi32(ia[i], wv, x)
            } else if signed(T, VNNI) {
                let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, wv));
                _mm256_add_epi32(ia[i], _mm256_madd_epi16(p16, ones))
            } else {
                // Codes are at most 63 and activations at least -128:
                // the pair sums fit in 16 bits.
                let p16 = _mm256_maddubs_epi16(wv, x);
                _mm256_add_epi32(ia[i], _mm256_madd_epi16(p16, ones))
            };
        }
    }
    (ia, groups)
}

/// The first `nr` floats at `p`, the rest zero.
#[inline(always)]
unsafe fn load_lanes(p: *const f32, nr: usize) -> __m256 {
    if nr == NR {
        return _mm256_loadu_ps(p);
    }
    let mut t = [0f32; NR];
    std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), nr);
    _mm256_loadu_ps(t.as_ptr())
}

/// Store the first `nr` lanes of `v` at `p`.
#[inline(always)]
unsafe fn store_lanes(p: *mut f32, nr: usize, v: __m256) {
    if nr == NR {
        _mm256_storeu_ps(p, v);
        return;
    }
    let mut t = [0f32; NR];
    _mm256_storeu_ps(t.as_mut_ptr(), v);
    std::ptr::copy_nonoverlapping(t.as_ptr(), p, nr);
}
