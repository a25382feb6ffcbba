//! The one rule for the files a command writes (`vlp embed --out`, `vlp eval retrieval
//! --out` / `--markdown`), checked before any work so that a finished result is never
//! lost to a path that cannot take it: an existing file inside a training run or
//! checkpoint is never replaced (a clobbered checkpoint file would be resumed as the
//! run's own); any other existing file only with `--force`; the folder must exist and
//! take a new file.

use std::path::Path;

use vlp_train::checkpoint::enclosing_run;

/// Checks that `path` (given as `flag`) may receive the command's output.
pub fn check_output_file(flag: &str, path: &Path, force: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        !path.is_dir(),
        "{flag} {} is a folder; give a file name",
        path.display()
    );
    // An existing file of a run, or a new file inside a checkpoint or below the top of a
    // run folder (`checkpoints/`, `best/`), would be taken for part of it or swept away.
    if let Some(run) = enclosing_run(path) {
        if path.exists() || run.is_checkpoint() || run.depth > 1 {
            anyhow::bail!(
                "{flag} {} is inside the training run or checkpoint {} (it {}): write it \
                 outside the run's files (--force does not apply)",
                path.display(),
                run.dir.display(),
                run.why()
            );
        }
    }
    if path.exists() {
        anyhow::ensure!(
            force,
            "{flag} {} already exists; pass --force to replace it",
            path.display()
        );
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    anyhow::ensure!(
        folder.is_dir(),
        "{flag} {}: the folder {} does not exist",
        path.display(),
        folder.display()
    );
    // A probe file, removed at once: the only sure test that the folder takes new files
    // (permissions, read-only mounts, ACLs).
    let probe = folder.join(format!(".vlp-probe-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: cannot write in {}: {e}",
            path.display(),
            folder.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}
