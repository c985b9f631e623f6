//! The checks every kernel family passes, shared by their tests: scalar
//! against the f64 reference, AVX2 against scalar and reference, and tiles
//! bit-identical to single products.

use crate::{gemm, gemm_all, reference, ActBuf, Isa, Out, WType, Weights};

/// xorshift64*: deterministic test data without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// Next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// What a family's tests provide: its types, random weights and activations,
/// and the error bound of one product.
pub(crate) trait Family {
    /// The types.
    const TYPES: &'static [WType];
    /// (k, n) for the accuracy checks.
    const SHAPES: &'static [(usize, usize)];
    /// (k, n) for the tile check.
    const TILE_SHAPES: &'static [(usize, usize)];
    /// Activation row counts for the tile check.
    const TILE_ROWS: &'static [usize];
    /// `n` rows of `k` random weights of `wtype`.
    fn weights(wtype: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8>;
    /// `m` random activation rows and their rounding for `wtype`.
    fn acts(wtype: WType, k: usize, m: usize, rng: &mut Rng) -> (Vec<f32>, ActBuf);
    /// How far a kernel may be from the f64 reference for (row `w`, act row `i`).
    fn bound(wtype: WType, w: &[u8], a: &ActBuf, i: usize) -> f64;
}

/// Every row of `w` times every row of `a`, on this thread.
pub(crate) fn run(w: &Weights, a: &ActBuf, isa: Isa) -> Vec<f32> {
    let mut out = vec![f32::NAN; a.rows() * w.n];
    gemm_all(w, a, &mut out, isa);
    out
}

/// The scalar kernels are within the family's bound of the f64 reference.
pub(crate) fn scalar_matches_reference<F: Family>() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for &wtype in F::TYPES {
        for &(k, n) in F::SHAPES {
            let wb = F::weights(wtype, k, n, &mut rng);
            let w = Weights::new(wtype, &wb, k, n).unwrap();
            let (_, a) = F::acts(wtype, k, 3, &mut rng);
            let out = run(&w, &a, Isa::scalar());
            for i in 0..a.rows() {
                for r in 0..n {
                    let exact = reference::dot_f64(wtype, w.row(r), &a, i);
                    let got = out[i * n + r] as f64;
                    let b = F::bound(wtype, w.row(r), &a, i);
                    assert!(
                        (got - exact).abs() <= b,
                        "{wtype:?} k={k} n={n} ({i},{r}): {got} vs {exact}, bound {b}"
                    );
                }
            }
        }
    }
}

/// The SIMD kernels of every tier this CPU runs (AVX2 and AVX-512 VNNI;
/// NEON, dot product and i8mm) are within the bound of the reference, and
/// within twice it of the scalar ones (FMA rounds once where scalar rounds
/// twice; prefill panels scale per group where ggml's K-quant dot scales
/// per super-block). Row counts cover decode (1), the row tiles (3) and the
/// prefill panels with a remainder (13). Prints the tiers it checked.
pub(crate) fn simd_matches_scalar_and_reference<F: Family>() {
    let isas: Vec<Isa> = Isa::detect()
        .tiers()
        .into_iter()
        .filter(|&t| t != Isa::scalar())
        .collect();
    eprintln!(
        "{:?}: tiers checked against scalar: [{}]",
        F::TYPES,
        isas.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    );
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for isa in isas {
        for &wtype in F::TYPES {
            for &(k, n) in F::SHAPES {
                let wb = F::weights(wtype, k, n, &mut rng);
                let w = Weights::new(wtype, &wb, k, n).unwrap();
                for m in [1, 3, 13] {
                    let (_, a) = F::acts(wtype, k, m, &mut rng);
                    let simd = run(&w, &a, isa);
                    let scalar = run(&w, &a, Isa::scalar());
                    for i in 0..m {
                        for r in 0..n {
                            let b = F::bound(wtype, w.row(r), &a, i);
                            let exact = reference::dot_f64(wtype, w.row(r), &a, i);
                            let (s, v) = (scalar[i * n + r] as f64, simd[i * n + r] as f64);
                            assert!(
                                (v - exact).abs() <= b,
                                "{isa:?} {wtype:?} k={k} n={n} m={m} ({i},{r}): {v} vs {exact}"
                            );
                            assert!(
                                (v - s).abs() <= 2.0 * b,
                                "{isa:?} {wtype:?} k={k} n={n} m={m} ({i},{r}): {v} vs scalar {s}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// How the work is split never changes a result, bit for bit: an element
/// computed with every weight row equals it computed alone (one weight row,
/// as a thread's share may be), and an activation row gives the same
/// products in any batch of the same path (decode and small tiles: alone;
/// prefill panels: in any batch of at least their threshold of rows).
pub(crate) fn tiles_are_bit_identical<F: Family>() {
    for isa in Isa::detect().tiers() {
        tiles_are_bit_identical_at::<F>(isa);
    }
}

fn tiles_are_bit_identical_at<F: Family>(isa: Isa) {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for &wtype in F::TYPES {
        for &(k, n) in F::TILE_SHAPES {
            let wb = F::weights(wtype, k, n, &mut rng);
            let w = Weights::new(wtype, &wb, k, n).unwrap();
            for &m in F::TILE_ROWS {
                let (x, a) = F::acts(wtype, k, m, &mut rng);
                let all = run(&w, &a, isa);
                // The same row in a batch of the same path: alone below the
                // panel threshold, else with the batch's first rows around it.
                let batch = m.min(isa.panel_rows());
                let mut other = ActBuf::new(wtype.act_type(), k, batch);
                for i in 0..m {
                    let mut rows: Vec<f32> = Vec::with_capacity(batch * k);
                    let peers = (0..m).filter(|&j| j != i).take(batch - 1);
                    rows.extend_from_slice(&x[i * k..(i + 1) * k]);
                    for j in peers {
                        rows.extend_from_slice(&x[j * k..(j + 1) * k]);
                    }
                    other.quantize(&rows);
                    let row = run(&w, &other, isa);
                    for r in 0..n {
                        let t = all[i * n + r];
                        assert_eq!(
                            t.to_bits(),
                            row[r].to_bits(),
                            "{isa} {wtype:?} m={m} ({i},{r}) vs the row in another batch"
                        );
                    }
                }
                for r in 0..n {
                    let mut single = vec![f32::NAN; m];
                    // SAFETY: gemm writes only elements (i, r), at single[i].
                    unsafe {
                        let o = Out {
                            ptr: single.as_mut_ptr().wrapping_sub(r),
                            ld: 1,
                        };
                        gemm(&w, r..r + 1, &a, o, isa);
                    }
                    for i in 0..m {
                        assert_eq!(
                            all[i * n + r].to_bits(),
                            single[i].to_bits(),
                            "{isa} {wtype:?} m={m} ({i},{r}) vs weight row alone"
                        );
                    }
                }
            }
        }
    }
}

/// Interleaving rows in groups of eight ([`crate::Layout::Rows8`]) changes
/// where the bytes are, not one bit of any product (decode, short batches,
/// prefill panels; every instruction set; whole groups and the row-major
/// tail), nor the rows an embedding lookup reads.
pub(crate) fn rows8_layout_gives_the_same_products<F: Family>() {
    use crate::{dequantize_row, Layout};
    let mut rng = Rng(0x5EED_0008);
    let detected = Isa::detect();
    for &wtype in F::TYPES {
        for &(k, n) in F::TILE_SHAPES {
            let wb = F::weights(wtype, k, n, &mut rng);
            let w = Weights::new(wtype, &wb, k, n).unwrap();
            let packed = w.repack_rows8().expect("eight rows or more");
            // With one block per row the two layouts coincide.
            assert!(
                k == wtype.block_len() || packed != wb,
                "{wtype:?} not interleaved"
            );
            let p = w.with_rows8(&packed);
            assert_eq!(p.layout, Layout::Rows8);
            for r in 0..n {
                let (mut x, mut y) = (vec![0f32; k], vec![0f32; k]);
                dequantize_row(&w, r, &mut x);
                dequantize_row(&p, r, &mut y);
                assert_eq!(x, y, "{wtype:?} row {r}");
            }
            for isa in detected.tiers() {
                for m in [1, 3, 13] {
                    let (_, a) = F::acts(wtype, k, m, &mut rng);
                    let bits = |w: &Weights| {
                        run(w, &a, isa)
                            .iter()
                            .map(|f| f.to_bits())
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&w), bits(&p), "{wtype:?} k={k} n={n} m={m} {isa:?}");
                }
            }
        }
    }
}
