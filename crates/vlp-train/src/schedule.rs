//! Learning-rate schedule: linear warmup, then cosine decay (ALBEF pretraining, the
//! `CosineLRScheduler` with `warmup_lr_init` of its `scheduler/cosine_lr.py`), as a pure
//! function of the step.

use serde::{Deserialize, Serialize};

/// Linear warmup from `warmup_lr` to `lr` over `warmup_steps`, then cosine from `lr` to
/// `min_lr` over the remaining `total_steps - warmup_steps`; `min_lr` after `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// ALBEF's pretraining schedule: 1e-5 -> 1e-4 over 2000 steps, cosine to 1e-5.
    pub fn albef_pretrain(total_steps: u64) -> Self {
        Schedule {
            lr: 1e-4,
            min_lr: 1e-5,
            warmup_lr: 1e-5,
            warmup_steps: 2000,
            total_steps,
        }
    }

    /// The learning rate of optimizer step `step` (0-based). Pure.
    pub fn get_lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            let frac = step as f64 / self.warmup_steps as f64;
            return self.warmup_lr + (self.lr - self.warmup_lr) * frac;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 || step >= self.total_steps {
            return self.min_lr;
        }
        let progress = (step - self.warmup_steps) as f64 / decay_steps as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.lr - self.min_lr) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-15, "{a} != {b}");
    }

    #[test]
    fn albef_warmup_is_linear_from_warmup_lr() {
        let s = Schedule::albef_pretrain(10_000);
        close(s.get_lr(0), 1e-5);
        close(s.get_lr(1000), 5.5e-5);
        close(s.get_lr(1999), 1e-5 + 9e-5 * 1999.0 / 2000.0);
        close(s.get_lr(2000), 1e-4);
    }

    #[test]
    fn cosine_reaches_midpoint_and_floor() {
        let s = Schedule::albef_pretrain(10_000);
        // Halfway through the decay the cosine factor is exactly 1/2.
        close(s.get_lr(6000), 1e-5 + 9e-5 * 0.5);
        // A quarter of the way: (1 + cos(pi/4)) / 2.
        close(
            s.get_lr(4000),
            1e-5 + 9e-5 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2),
        );
        close(s.get_lr(10_000), 1e-5);
        close(s.get_lr(50_000), 1e-5);
    }

    #[test]
    fn no_warmup_and_degenerate_totals() {
        let s = Schedule {
            lr: 1.0,
            min_lr: 0.0,
            warmup_lr: 0.0,
            warmup_steps: 0,
            total_steps: 4,
        };
        close(s.get_lr(0), 1.0);
        close(s.get_lr(2), 0.5);
        close(s.get_lr(4), 0.0);
        let flat = Schedule {
            warmup_steps: 4,
            total_steps: 4,
            ..s
        };
        close(flat.get_lr(2), 0.5);
        close(flat.get_lr(4), 0.0);
    }

    #[test]
    fn monotone_after_warmup() {
        let s = Schedule::albef_pretrain(5000);
        let lrs: Vec<f64> = (2000..=5000).map(|t| s.get_lr(t)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }
}
