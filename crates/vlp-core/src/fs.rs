//! Permissions of files written by the safetensors writer, which creates them owner-only
//! (0600: it writes a temporary file and renames it) whatever the umask says, while
//! every other file vlp writes gets the mode the umask gives. A model shared through a
//! group-readable folder would otherwise be the one file the group cannot read.

use std::fs::Permissions;
use std::io;
use std::path::Path;

/// Gives `path` the permissions of `like`, a file this process created the ordinary way
/// (so the umask, and a folder's default ACL, applied to it).
pub fn same_mode_as(path: &Path, like: &Path) -> io::Result<()> {
    let perms = std::fs::metadata(like)?.permissions();
    std::fs::set_permissions(path, perms)
}

/// The permissions an ordinary new file at `path` gets, for a writer about to replace
/// `path` with an owner-only file and no sibling to copy them from: `path` is created
/// (empty; truncated if it is there, so pass the writer's own temporary name) and its
/// permissions read. Give them to the written file with `std::fs::set_permissions`.
pub fn new_file_permissions(path: &Path) -> io::Result<Permissions> {
    Ok(std::fs::File::create(path)?.metadata()?.permissions())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_file_gets_what_the_umask_gives_and_a_copy_follows_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let like = dir.join("like");
        std::fs::write(&like, b"x").unwrap();
        let probe = dir.join("probe");
        let perms = new_file_permissions(&probe).unwrap();
        assert_eq!(
            perms.mode() & 0o777,
            std::fs::metadata(&like).unwrap().permissions().mode() & 0o777
        );
        let owner_only = dir.join("owner-only");
        std::fs::write(&owner_only, b"x").unwrap();
        std::fs::set_permissions(&owner_only, Permissions::from_mode(0o600)).unwrap();
        same_mode_as(&owner_only, &like).unwrap();
        assert_eq!(
            std::fs::metadata(&owner_only).unwrap().permissions().mode() & 0o777,
            std::fs::metadata(&like).unwrap().permissions().mode() & 0o777
        );
    }
}
