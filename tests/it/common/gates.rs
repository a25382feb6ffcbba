// The tests that need something a fresh checkout lacks (a Python with packages, minutes of
// CPU) and the variables that turn them on. This file is read twice: `build.rs` includes it
// to turn each variable that is set into a `--cfg` of the test binary, so a gated test built
// without its variable is reported `ignored` with the reason instead of passing without
// having run; the tests use it to read the variable's value and to check the gates.
// (No inner doc comments here: `include!` does not accept them.)

/// A variable that turns a group of tests on, and the `cfg` the build gives them.
pub struct Gate {
    /// The environment variable, e.g. `VLP_PYTHON`.
    pub var: &'static str,
    /// The `cfg` set when the variable is (`#[cfg_attr(not(CFG), ignore = "...")]`).
    #[allow(dead_code)] // read by build.rs
    pub cfg: &'static str,
    /// What the variable holds, for messages.
    pub holds: &'static str,
}

/// The slow end-to-end proofs that pretraining learns (minutes on 2 cores).
pub const SLOW: Gate = Gate {
    var: "VLP_SLOW_TESTS",
    cfg: "vlp_slow_tests",
    holds: "1",
};

/// The interop checks with Python's reference readers (webdataset, TensorBoard).
pub const PYTHON: Gate = Gate {
    var: "VLP_PYTHON",
    cfg: "vlp_python",
    holds: "the path of a Python with the packages of `.ci/run`'s venv",
};

pub const GATES: &[Gate] = &[SLOW, PYTHON];

/// Whether a variable's value turns something on: set, not empty, and not `0` or `false`
/// (so `VLP_SLOW_TESTS=0` and `CI=false` mean off, as people write them).
pub fn is_on(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

impl Gate {
    /// The variable's value when it is on.
    pub fn value(&self) -> Option<String> {
        std::env::var(self.var)
            .ok()
            .filter(|v| is_on(Some(v.as_str())))
    }

    /// The variable's value, for a gated test that runs: one run with `--include-ignored`
    /// but without the variable fails here, naming it.
    #[allow(dead_code)]
    pub fn required(&self) -> String {
        self.value().unwrap_or_else(|| {
            panic!(
                "this test needs {} set to {}; it is ignored when built without it",
                self.var, self.holds
            )
        })
    }
}

/// The gates that are closed although `ci` (the value of `CI`) says this is a CI run, where
/// every test must run: a CI run that lost a variable fails instead of reporting fewer
/// tests. `value` reads a variable (the environment, or a test's own).
#[allow(dead_code)]
pub fn closed_in_ci(ci: Option<&str>, value: impl Fn(&str) -> Option<String>) -> Vec<&'static str> {
    if !is_on(ci) {
        return Vec::new();
    }
    GATES
        .iter()
        .filter(|g| !is_on(value(g.var).as_deref()))
        .map(|g| g.var)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that a gate turns on, by their name in this binary. A test gated in its
    /// source but missing here shows up as ignored without a gate, and fails the check below.
    const GATED: &[(&str, &Gate)] = &[
        (
            "pretrain::pretrain_learns_itc_retrieval_on_synthetic_shapes",
            &SLOW,
        ),
        (
            "pretrain::quickstart_recipe_learns_the_held_out_emoji_style",
            &SLOW,
        ),
        (
            "pretrain::python_tensorboard_reads_the_event_files",
            &PYTHON,
        ),
        ("shards_write::python_webdataset_reads_the_shards", &PYTHON),
    ];

    /// The tests this binary reports as ignored (its own `--list --ignored`).
    fn ignored_tests() -> Vec<String> {
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = std::process::Command::new(exe)
            .args(["--list", "--ignored"])
            .output()
            .expect("list the ignored tests");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn gated_tests_are_ignored_exactly_when_their_variable_is_off() {
        let mut expected: Vec<String> = GATED
            .iter()
            .filter(|(_, gate)| gate.value().is_none())
            .map(|(name, _)| name.to_string())
            .collect();
        expected.sort();
        let mut ignored = ignored_tests();
        ignored.sort();
        assert_eq!(
            ignored,
            expected,
            "ignored tests (left) differ from the gated tests whose variable is off (right); \
             a test built with other values of {:?} than this run has needs a rebuild",
            GATES.iter().map(|g| g.var).collect::<Vec<_>>()
        );
    }

    #[test]
    fn ci_requires_every_gate_variable() {
        let none = |_: &str| None;
        let all = |_: &str| Some("1".to_string());
        let no_python = |var: &str| (var != PYTHON.var).then(|| "1".to_string());
        assert_eq!(
            closed_in_ci(Some("true"), none),
            ["VLP_SLOW_TESTS", "VLP_PYTHON"]
        );
        assert_eq!(closed_in_ci(Some("true"), no_python), ["VLP_PYTHON"]);
        assert!(closed_in_ci(Some("true"), all).is_empty());
        // Off switches as people write them; not a CI run.
        for ci in [None, Some(""), Some("0"), Some("false")] {
            assert!(closed_in_ci(ci, none).is_empty(), "{ci:?}");
        }
        assert_eq!(
            closed_in_ci(Some("true"), |v: &str| (v == PYTHON.var)
                .then(|| "0".into())),
            ["VLP_SLOW_TESTS", "VLP_PYTHON"]
        );

        // This run: under CI every gated test must have run.
        let ci = std::env::var("CI").ok();
        let closed = closed_in_ci(ci.as_deref(), |v| std::env::var(v).ok());
        assert!(
            closed.is_empty(),
            "CI={ci:?}, but {closed:?} not set: their tests were ignored (see README, tests)"
        );
    }
}
