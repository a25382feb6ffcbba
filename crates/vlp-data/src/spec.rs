//! Shard specifications as WebDataset users write them: brace ranges
//! (`train-{000000..000099}.tar`), brace lists (`{a,b}`), several sources joined with `::`,
//! a directory (all its `*.tar`, sorted), and `pipe:COMMAND` sources whose standard output
//! is a tar stream (`pipe:aws s3 cp s3://bucket/train-{0000..0009}.tar -`).

use std::fmt;
use std::path::PathBuf;

use crate::error::{DataError, Result};

/// Where one shard's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ShardUrl {
    /// A tar file on a local file system.
    Local(PathBuf),
    /// A shell command whose standard output is the tar stream.
    Pipe(String),
}

impl ShardUrl {
    /// The url as WebDataset writes it into `__url__`.
    pub fn as_string(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ShardUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardUrl::Local(p) => write!(f, "{}", p.display()),
            ShardUrl::Pipe(cmd) => write!(f, "pipe:{cmd}"),
        }
    }
}

/// Expands a spec into its shard urls, in the order written.
///
/// A local path without braces that names a directory expands to the directory's `*.tar`
/// files, sorted by name (img2dataset's output folder reads as-is). Paths are not checked
/// for existence here: a missing shard is reported when it is opened, under the loader's
/// bad-data policy.
pub fn expand_spec(spec: &str) -> Result<Vec<ShardUrl>> {
    let mut urls = Vec::new();
    for source in spec.split("::") {
        let source = source.trim();
        if source.is_empty() {
            return Err(DataError::Spec {
                spec: spec.to_string(),
                reason: "empty source between `::` separators".into(),
            });
        }
        for expanded in expand_braces(source).map_err(|reason| DataError::Spec {
            spec: spec.to_string(),
            reason,
        })? {
            if let Some(cmd) = expanded.strip_prefix("pipe:") {
                if cmd.trim().is_empty() {
                    return Err(DataError::Spec {
                        spec: spec.to_string(),
                        reason: "`pipe:` with no command".into(),
                    });
                }
                urls.push(ShardUrl::Pipe(cmd.to_string()));
                continue;
            }
            let path = PathBuf::from(expanded.strip_prefix("file:").unwrap_or(&expanded));
            if path.is_dir() {
                let mut tars: Vec<PathBuf> = std::fs::read_dir(&path)
                    .map_err(|e| DataError::io(&path, e))?
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|ext| ext == "tar"))
                    .collect();
                tars.sort();
                if tars.is_empty() {
                    return Err(DataError::Spec {
                        spec: spec.to_string(),
                        reason: format!("directory {} holds no .tar file", path.display()),
                    });
                }
                urls.extend(tars.into_iter().map(ShardUrl::Local));
            } else if !path.exists() && expanded.contains(['*', '?', '[']) {
                // Globs are not expanded (shells do that); an unexpanded one names no file,
                // and every shard would be reported missing only once reading starts.
                return Err(DataError::Spec {
                    spec: spec.to_string(),
                    reason: format!(
                        "`{expanded}` matches no file: wildcards are not expanded; \
                         give the directory or a brace range such as `train-{{000000..000099}}.tar`"
                    ),
                });
            } else {
                urls.push(ShardUrl::Local(path));
            }
        }
    }
    if urls.is_empty() {
        return Err(DataError::NoShards {
            spec: spec.to_string(),
        });
    }
    Ok(urls)
}

/// Bash-style brace expansion: `{000..012}` (zero-padded to the width of the first bound
/// when it has a leading zero), `{a,b,c}`; several groups give their product, left to right.
pub fn expand_braces(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(format!("unmatched `}}` in `{pattern}`"));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| format!("unmatched `{{` in `{pattern}`"))?;
    let (prefix, body, rest) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    if body.contains('{') {
        return Err(format!("nested braces are not supported in `{pattern}`"));
    }
    let alternatives = brace_alternatives(body)?;
    let tails = expand_braces(rest)?;
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for alt in &alternatives {
        for tail in &tails {
            out.push(format!("{prefix}{alt}{tail}"));
        }
    }
    Ok(out)
}

fn brace_alternatives(body: &str) -> std::result::Result<Vec<String>, String> {
    if let Some((lo, hi)) = body.split_once("..") {
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("`{{{body}}}`: `{s}` is not a non-negative integer"))
        };
        let (start, end) = (parse(lo)?, parse(hi)?);
        if start > end {
            return Err(format!("`{{{body}}}`: the range is descending"));
        }
        if end - start > 10_000_000 {
            return Err(format!("`{{{body}}}`: more than 10 million shards"));
        }
        let width = if lo.len() > 1 && lo.starts_with('0') || hi.len() > 1 && hi.starts_with('0') {
            lo.len().max(hi.len())
        } else {
            0
        };
        Ok((start..=end).map(|i| format!("{i:0width$}")).collect())
    } else if body.contains(',') {
        Ok(body.split(',').map(str::to_string).collect())
    } else {
        Err(format!(
            "`{{{body}}}` is neither a range `{{a..b}}` nor a list `{{a,b}}`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_range_keeps_zero_padding() {
        let v = expand_braces("s-{000008..000011}.tar").unwrap();
        assert_eq!(
            v,
            [
                "s-000008.tar",
                "s-000009.tar",
                "s-000010.tar",
                "s-000011.tar"
            ]
        );
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
    }

    #[test]
    fn lists_and_products() {
        let v = expand_braces("{a,b}/x-{0..1}.tar").unwrap();
        assert_eq!(v, ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]);
    }

    #[test]
    fn malformed_braces_are_errors() {
        assert!(expand_braces("x-{0..").is_err());
        assert!(expand_braces("x-}").is_err());
        assert!(expand_braces("x-{5..1}").is_err());
        assert!(expand_braces("x-{a..b}").is_err());
        assert!(expand_braces("x-{abc}").is_err());
    }

    #[test]
    fn sources_join_with_double_colon_and_pipes_expand() {
        let urls = expand_spec("a-{0..1}.tar::pipe:cat b-{00..01}.tar").unwrap();
        assert_eq!(
            urls,
            [
                ShardUrl::Local("a-0.tar".into()),
                ShardUrl::Local("a-1.tar".into()),
                ShardUrl::Pipe("cat b-00.tar".into()),
                ShardUrl::Pipe("cat b-01.tar".into()),
            ]
        );
        assert_eq!(urls[2].to_string(), "pipe:cat b-00.tar");
        assert!(expand_spec("a.tar::").is_err());
        assert!(expand_spec("pipe:").is_err());
    }

    #[test]
    fn directory_expands_to_its_sorted_tars() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "00001.tar",
            "00000.tar",
            "00000_stats.json",
            "00000.parquet",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let urls = expand_spec(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(
            urls,
            [
                ShardUrl::Local(dir.path().join("00000.tar")),
                ShardUrl::Local(dir.path().join("00001.tar")),
            ]
        );
    }

    #[test]
    fn a_glob_or_an_empty_directory_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let empty = expand_spec(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(empty.contains("holds no .tar file"), "{empty}");
        let glob = format!("{}/*.tar", dir.path().display());
        let e = expand_spec(&glob).unwrap_err().to_string();
        assert!(e.contains("*.tar") && e.contains("wildcards"), "{e}");
    }
}
