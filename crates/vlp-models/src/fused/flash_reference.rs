//! The CUDA attention kernels' algorithm (`vlp-kernels/cuda/attention.cu`) written out on
//! the CPU, step for step, and tested against the fused CPU op: key tiles of 64 and
//! sub-tiles of 16 with an online softmax and the log-sum-exp saved; a backward that
//! recomputes the probabilities from the log-sum-exp, one pass per key for dK and dV and
//! one per query for dQ; masks and dropout decided per element. So the tiling logic is
//! checked on machines without a GPU; the GPU check then compares the kernels with the
//! CPU op on the device.

use super::dropout::DropoutMask;

const FWD_KEYS: usize = 64;
const SUB: usize = 16;

/// `[B, L, heads * d]` inputs, row-major; a per-key mask of `lk` or `b * lk` values.
pub(crate) struct Problem<'a> {
    pub(crate) b: usize,
    pub(crate) heads: usize,
    pub(crate) d: usize,
    pub(crate) lq: usize,
    pub(crate) lk: usize,
    pub(crate) q: &'a [f64],
    pub(crate) k: &'a [f64],
    pub(crate) v: &'a [f64],
    pub(crate) mask: Option<&'a [f64]>,
    pub(crate) dropout: Option<DropoutMask>,
    pub(crate) scale: f64,
}

impl Problem<'_> {
    fn c(&self) -> usize {
        self.heads * self.d
    }
    fn row<'x>(&self, x: &'x [f64], b: usize, l: usize, len: usize, h: usize) -> &'x [f64] {
        let start = (b * len + l) * self.c() + h * self.d;
        &x[start..start + self.d]
    }
    fn mask(&self, b: usize, j: usize) -> f64 {
        match self.mask {
            None => 0.0,
            Some(m) if m.len() == self.lk => m[j],
            Some(m) => m[b * self.lk + j],
        }
    }
    fn keep(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        match &self.dropout {
            None => 1.0,
            Some(d) => f64::from(d.keep(((b * self.heads + h) * self.lq + i) * self.lk + j)),
        }
    }
    fn score(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let q = self.row(self.q, b, i, self.lq, h);
        let k = self.row(self.k, b, j, self.lk, h);
        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * self.scale + self.mask(b, j)
    }

    /// The forward: the output `[B, Lq, C]` and the log-sum-exp `[B, heads, Lq]`.
    pub(crate) fn forward(&self) -> (Vec<f64>, Vec<f64>) {
        let (c, d) = (self.c(), self.d);
        let mut out = vec![0.0; self.b * self.lq * c];
        let mut lse = vec![0.0; self.b * self.heads * self.lq];
        for b in 0..self.b {
            for h in 0..self.heads {
                for i in 0..self.lq {
                    let mut acc = vec![0.0; d];
                    let (mut mx, mut l) = (f64::NEG_INFINITY, 0.0);
                    for j0 in (0..self.lk).step_by(FWD_KEYS) {
                        let nk = FWD_KEYS.min(self.lk - j0);
                        for s0 in (0..nk).step_by(SUB) {
                            let ns = SUB.min(nk - s0);
                            let s: Vec<f64> =
                                (0..ns).map(|t| self.score(b, h, i, j0 + s0 + t)).collect();
                            let nm = s.iter().copied().fold(mx, f64::max);
                            if nm == f64::NEG_INFINITY {
                                continue;
                            }
                            let corr = if mx == f64::NEG_INFINITY {
                                0.0
                            } else {
                                (mx - nm).exp()
                            };
                            l *= corr;
                            acc.iter_mut().for_each(|a| *a *= corr);
                            for (t, &st) in s.iter().enumerate() {
                                let j = j0 + s0 + t;
                                let p = (st - nm).exp();
                                l += p;
                                let pk = p * self.keep(b, h, i, j);
                                let vr = self.row(self.v, b, j, self.lk, h);
                                for (a, &vv) in acc.iter_mut().zip(vr) {
                                    *a += pk * vv;
                                }
                            }
                            mx = nm;
                        }
                    }
                    let o = &mut out[(b * self.lq + i) * c + h * d..][..d];
                    for (o, a) in o.iter_mut().zip(&acc) {
                        *o = a / l;
                    }
                    lse[(b * self.heads + h) * self.lq + i] = mx + l.ln();
                }
            }
        }
        (out, lse)
    }

    /// The backward from the forward's output, its log-sum-exp and the output's gradient:
    /// `(dq, dk, dv)`, each like its input.
    pub(crate) fn backward(&self, out: &[f64], lse: &[f64], g: &[f64]) -> [Vec<f64>; 3] {
        let (c, d) = (self.c(), self.d);
        let row = |b: usize, h: usize, i: usize| (b * self.heads + h) * self.lq + i;
        // delta_i = rowsum(dO_i * O_i)
        let mut delta = vec![0.0; self.b * self.heads * self.lq];
        for b in 0..self.b {
            for h in 0..self.heads {
                for i in 0..self.lq {
                    delta[row(b, h, i)] = self
                        .row(out, b, i, self.lq, h)
                        .iter()
                        .zip(self.row(g, b, i, self.lq, h))
                        .map(|(o, g)| o * g)
                        .sum();
                }
            }
        }
        let p_ds = |b: usize, h: usize, i: usize, j: usize| {
            let r = row(b, h, i);
            let p = if lse[r] == f64::NEG_INFINITY {
                0.0
            } else {
                (self.score(b, h, i, j) - lse[r]).exp()
            };
            let keep = self.keep(b, h, i, j);
            let dp: f64 = self
                .row(g, b, i, self.lq, h)
                .iter()
                .zip(self.row(self.v, b, j, self.lk, h))
                .map(|(a, b)| a * b)
                .sum();
            (p, keep, p * (dp * keep - delta[r]))
        };
        let mut dq = vec![0.0; self.q.len()];
        let mut dk = vec![0.0; self.k.len()];
        let mut dv = vec![0.0; self.v.len()];
        for b in 0..self.b {
            for h in 0..self.heads {
                // One pass per key: dK, dV.
                for j in 0..self.lk {
                    let (mut dka, mut dva) = (vec![0.0; d], vec![0.0; d]);
                    for i in 0..self.lq {
                        let (p, keep, ds) = p_ds(b, h, i, j);
                        let (qr, gr) = (
                            self.row(self.q, b, i, self.lq, h),
                            self.row(g, b, i, self.lq, h),
                        );
                        for e in 0..d {
                            dva[e] += p * keep * gr[e];
                            dka[e] += ds * qr[e];
                        }
                    }
                    let at = (b * self.lk + j) * c + h * d;
                    for e in 0..d {
                        dk[at + e] = dka[e] * self.scale;
                        dv[at + e] = dva[e];
                    }
                }
                // One pass per query: dQ.
                for i in 0..self.lq {
                    let mut dqa = vec![0.0; d];
                    for j in 0..self.lk {
                        let (_, _, ds) = p_ds(b, h, i, j);
                        for (a, &kv) in dqa.iter_mut().zip(self.row(self.k, b, j, self.lk, h)) {
                            *a += ds * kv;
                        }
                    }
                    let at = (b * self.lq + i) * c + h * d;
                    for e in 0..d {
                        dq[at + e] = dqa[e] * self.scale;
                    }
                }
            }
        }
        [dq, dk, dv]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::attention::FusedAttention;
    use candle_core::{Device, Result, Tensor, Var};
    use vlp_core::rng::Rng;

    fn randn(rng: &mut Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.uniform_range(-1.5, 1.5)).collect()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// The tiled algorithm against the fused CPU op, forward and all three gradients.
    fn check(
        b: usize,
        heads: usize,
        d: usize,
        lq: usize,
        lk: usize,
        masked: bool,
        drop: f64,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new((b * 1000 + lq * 10 + lk) as u64);
        let c = heads * d;
        let (q, k, v) = (
            randn(&mut rng, b * lq * c),
            randn(&mut rng, b * lk * c),
            randn(&mut rng, b * lk * c),
        );
        let g = randn(&mut rng, b * lq * c);
        // Per batch row: the last `row + 1` keys padded out (BERT's -10000), so some rows
        // see fewer than one tile of keys.
        let mask: Option<Vec<f64>> = masked.then(|| {
            (0..b)
                .flat_map(|r| {
                    (0..lk).map(move |j| {
                        if j + r + 1 >= lk && j > 0 {
                            -10_000.0
                        } else {
                            0.0
                        }
                    })
                })
                .collect()
        });
        let dropout = (drop > 0.0).then(|| DropoutMask::new(42 + lq as u64, drop));
        let scale = 1.0 / (d as f64).sqrt();
        let p = Problem {
            b,
            heads,
            d,
            lq,
            lk,
            q: &q,
            k: &k,
            v: &v,
            mask: mask.as_deref(),
            dropout,
            scale,
        };
        let (out, lse) = p.forward();
        let grads = p.backward(&out, &lse, &g);

        let var = |x: &[f64], l: usize| Var::from_tensor(&Tensor::from_slice(x, (b, l, c), &dev)?);
        let (qv, kv, vv) = (var(&q, lq)?, var(&k, lk)?, var(&v, lk)?);
        let op = FusedAttention {
            heads,
            scale,
            mask: mask.clone(),
            dropout,
            keep_probs: false,
            saved_probs: Default::default(),
            device_mask: None,
            stash: Default::default(),
        };
        let fused = qv
            .as_tensor()
            .apply_op3(kv.as_tensor(), vv.as_tensor(), op)?;
        let gt = Tensor::from_slice(&g, (b, lq, c), &dev)?;
        let store = (fused.clone() * gt)?.sum_all()?.backward()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f64>();
        let tol = 1e-10;
        assert!(max_diff(&out, &flat(&fused)?) < tol, "forward");
        for (name, (mine, x)) in ["dq", "dk", "dv"]
            .iter()
            .zip(grads.iter().zip([&qv, &kv, &vv]))
        {
            let theirs = flat(store.get(x.as_tensor()).expect("gradient"))?;
            let diff = max_diff(mine, &theirs);
            assert!(
                diff < tol,
                "{name}: {diff} (b {b}, heads {heads}, d {d}, lq {lq}, lk {lk})"
            );
        }
        Ok(())
    }

    #[test]
    fn self_attention_over_tiles_with_masks_and_dropout() -> Result<()> {
        // 70 keys: one full tile of 64 and a ragged one; sub-tiles of 16 end mid-tile.
        check(2, 2, 16, 70, 70, true, 0.0)?;
        check(2, 2, 16, 70, 70, true, 0.3)?;
        check(1, 1, 32, 33, 33, false, 0.1)
    }

    #[test]
    fn cross_attention_text_over_image_tokens() -> Result<()> {
        // 9 text tokens over 129 image tokens (3 tiles, the last of one key), as ALBEF's
        // fusion layers attend from text to 257 or 577 image tokens.
        check(2, 2, 16, 9, 129, false, 0.0)?;
        check(3, 1, 16, 5, 129, true, 0.2)
    }

    #[test]
    fn odd_sizes_one_query_one_key() -> Result<()> {
        check(1, 3, 16, 1, 1, false, 0.0)?;
        check(2, 1, 16, 3, 17, true, 0.5)
    }
}
