//! The real Linux account database: `/etc/passwd` to find the account, `/etc/shadow` to read its
//! hash, and `chpasswd -e` to store a new one.
//!
//! Lines of `/etc/passwd` that are not `name:password:uid:…` (NIS `+`/`-` entries, comments,
//! garbage) are skipped, as glibc's `files` NSS module skips them; of several entries with the
//! same name or UID, the first counts, as for `getpwnam`/`getpwuid`.
//!
//! The new hash reaches `chpasswd` on its standard input, never in its arguments or environment:
//! those are readable by every local user in `/proc/<pid>/cmdline` and `/proc/<pid>/environ`.
//! After `chpasswd` the hash is read back from `/etc/shadow`, so a success means the account
//! really holds it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fleetlaps_proto::ids::AccountName;

use super::{Account, AccountBackend, AccountError, PasswordHash};

/// At most this many characters of `chpasswd`'s standard error go into an error message.
const STDERR_LIMIT_CHARS: usize = 200;

/// The machine's local accounts, as the shadow suite keeps them.
///
/// The paths are configurable so that tests can point them at their own files; on a device they
/// are the system's ([`Default`]).
#[derive(Debug, Clone)]
pub struct LinuxAccounts {
    /// The user database, `/etc/passwd`: names and UIDs.
    pub passwd: PathBuf,
    /// The shadow database, `/etc/shadow`: password hashes. Only root can read it.
    pub shadow: PathBuf,
    /// The program that stores hashes, `/usr/sbin/chpasswd`, run with `-e`.
    pub chpasswd: PathBuf,
}

impl Default for LinuxAccounts {
    fn default() -> Self {
        Self {
            passwd: PathBuf::from("/etc/passwd"),
            shadow: PathBuf::from("/etc/shadow"),
            chpasswd: PathBuf::from("/usr/sbin/chpasswd"),
        }
    }
}

/// One usable line of `/etc/passwd`.
struct PasswdEntry {
    name: String,
    uid: u32,
}

impl LinuxAccounts {
    fn error(path: &Path, detail: impl std::fmt::Display) -> AccountError {
        AccountError::Database {
            path: path.display().to_string(),
            detail: detail.to_string(),
        }
    }

    fn read_passwd(&self) -> Result<Vec<PasswdEntry>, AccountError> {
        let text = fs::read_to_string(&self.passwd).map_err(|err| Self::error(&self.passwd, err))?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let _password = fields.next()?;
                let uid = fields.next()?.parse::<u32>().ok()?;
                (!name.is_empty() && !name.starts_with(['+', '-', '#'])).then(|| PasswdEntry {
                    name: name.to_owned(),
                    uid,
                })
            })
            .collect())
    }

    /// The hash field of `name`'s line in `/etc/shadow`, or `None` when it has no line.
    fn shadow_hash(&self, name: &AccountName) -> Result<Option<String>, AccountError> {
        let text = fs::read_to_string(&self.shadow).map_err(|err| Self::error(&self.shadow, err))?;
        Ok(text.lines().find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(name.as_str())).then(|| fields.next().unwrap_or_default().to_owned())
        }))
    }

    fn stored_hash(&self, name: &AccountName) -> Result<String, AccountError> {
        self.shadow_hash(name)?.ok_or_else(|| {
            Self::error(
                &self.shadow,
                format!("account {name} has no entry; it cannot have a password (run pwconv?)"),
            )
        })
    }

    /// Runs `chpasswd -e` with `line` on its standard input; the error carries its standard error.
    fn run_chpasswd(&self, line: &str) -> Result<(), AccountError> {
        let cannot_run = |err: io::Error| Self::error(&self.chpasswd, format!("cannot run it: {err}"));
        let mut child = Command::new(&self.chpasswd)
            .arg("-e")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(cannot_run)?;
        let written = match child.stdin.take() {
            // Dropping the pipe closes it, so chpasswd sees the end of its input.
            Some(mut stdin) => stdin.write_all(line.as_bytes()),
            None => Err(io::Error::other("no pipe to its standard input")),
        };
        let output = child.wait_with_output().map_err(cannot_run)?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stderr = stderr.trim().chars().take(STDERR_LIMIT_CHARS).collect::<String>();
            return Err(Self::error(
                &self.chpasswd,
                format!("-e failed ({}): {stderr}", output.status),
            ));
        }
        // A chpasswd that exits 0 without reading its input has stored nothing.
        written.map_err(|err| Self::error(&self.chpasswd, format!("writing its standard input: {err}")))
    }
}

impl AccountBackend for LinuxAccounts {
    fn resolve(&self, name: Option<&AccountName>) -> Result<Account, AccountError> {
        let entries = self.read_passwd()?;
        let entry = super::find_managed(&entries, name, |entry| (entry.name.as_str(), entry.uid))?;
        let account_name = AccountName::parse(&entry.name).map_err(|err| Self::error(&self.passwd, err))?;
        self.stored_hash(&account_name)?;
        Ok(Account {
            name: account_name,
            uid: entry.uid,
        })
    }

    fn password_hash(&self, account: &Account) -> Result<String, AccountError> {
        self.stored_hash(&account.name)
    }

    fn set_password_hash(&self, account: &Account, hash: &PasswordHash) -> Result<(), AccountError> {
        // A `:` or a line break would let the input name a different account or field. Hashes
        // this agent makes never hold one; a hash read back from the state database might.
        if hash.as_str().contains([':', '\n', '\r']) {
            return Err(Self::error(
                &self.chpasswd,
                "refusing a hash that holds ':' or a line break",
            ));
        }
        self.run_chpasswd(&format!("{}:{}\n", account.name, hash.as_str()))?;
        if self.stored_hash(&account.name)? != hash.as_str() {
            return Err(Self::error(
                &self.shadow,
                format!(
                    "after chpasswd -e succeeded, account {} does not hold the hash that was set",
                    account.name
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use fleetlaps_proto::password::Password;

    use crate::password_hash::HashRounds;

    use super::*;

    const PASSWD: &str = "\
root:x:1001:1001:not the administrator:/home/root:/bin/bash
+nis:x:0:0:::
toor:x:0:0:root:/root:/bin/bash
broken line
lapsadmin:x:1002:1002::/home/lapsadmin:/bin/bash
noshadow:x:1003:1003::/home/noshadow:/bin/bash
";

    const SHADOW: &str = "\
root:!:19000:0:99999:7:::
toor:$6$salt$roothash:19000:0:99999:7:::
lapsadmin:!*:19000:0:99999:7:::
";

    /// Temporary passwd and shadow files, and a `chpasswd` that is not the system's.
    struct Fixture {
        dir: tempfile::TempDir,
        backend: LinuxAccounts,
    }

    impl Fixture {
        fn new(chpasswd: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("passwd"), PASSWD).unwrap();
            fs::write(dir.path().join("shadow"), SHADOW).unwrap();
            let backend = LinuxAccounts {
                passwd: dir.path().join("passwd"),
                shadow: dir.path().join("shadow"),
                chpasswd: PathBuf::from(chpasswd),
            };
            Self { dir, backend }
        }

        /// Makes `chpasswd` a shell script with `body`; `$SHADOW` and `$DIR` are set in it.
        fn with_script(body: &str) -> Self {
            let mut fixture = Self::new("/nonexistent");
            let path = fixture.dir.path().join("chpasswd");
            let script = format!(
                "#!/bin/sh\nSHADOW='{}'\nDIR='{}'\n{body}\n",
                fixture.backend.shadow.display(),
                fixture.dir.path().display()
            );
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
            fixture.backend.chpasswd = path;
            fixture
        }

        fn name(name: &str) -> AccountName {
            AccountName::parse(name).unwrap()
        }

        /// `set_password_hash`, retried while the script is busy: another test's child process,
        /// forked while the script was open for writing, may hold it open until it execs.
        fn set(&self, account: &Account, hash: &PasswordHash) -> Result<(), AccountError> {
            let mut attempts = 0;
            loop {
                match self.backend.set_password_hash(account, hash) {
                    Err(err) if err.to_string().contains("Text file busy") && attempts < 50 => {
                        attempts += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    result => return result,
                }
            }
        }
    }

    #[test]
    fn no_name_means_the_account_with_uid_zero_whatever_it_is_called() {
        let fixture = Fixture::new("/nonexistent");

        let account = fixture.backend.resolve(None).unwrap();

        assert_eq!(account.name.as_str(), "toor");
        assert_eq!(account.uid, 0);
        assert_eq!(fixture.backend.password_hash(&account).unwrap(), "$6$salt$roothash");
    }

    #[test]
    fn a_named_account_is_found_with_its_stored_hash() {
        let fixture = Fixture::new("/nonexistent");

        let account = fixture.backend.resolve(Some(&Fixture::name("lapsadmin"))).unwrap();

        assert_eq!(account.uid, 1002);
        assert_eq!(fixture.backend.password_hash(&account).unwrap(), "!*");
        let password = Password::new("anything".to_owned());
        assert!(!fixture.backend.verify_password(&account, &password).unwrap());
    }

    #[test]
    fn an_absent_account_is_missing_and_one_without_a_shadow_entry_is_refused() {
        let fixture = Fixture::new("/nonexistent");

        let missing = fixture.backend.resolve(Some(&Fixture::name("ghost"))).unwrap_err();
        let no_shadow = fixture.backend.resolve(Some(&Fixture::name("noshadow"))).unwrap_err();

        assert!(matches!(missing, AccountError::Missing(_)), "{missing}");
        assert!(missing.to_string().contains("ghost does not exist"), "{missing}");
        assert!(matches!(no_shadow, AccountError::Database { .. }), "{no_shadow}");
        assert!(no_shadow.to_string().contains("noshadow has no entry"), "{no_shadow}");
    }

    #[test]
    fn the_hash_goes_to_chpasswd_e_on_stdin_and_is_read_back() {
        // Records its arguments, then stores the `name:hash` line it reads as real chpasswd -e does.
        let fixture = Fixture::with_script(
            r#"printf '%s\n' "$@" > "$DIR/argv"
IFS= read -r line
name=${line%%:*}
hash=${line#*:}
awk -F: -v OFS=: -v name="$name" -v hash="$hash" '$1 == name { $2 = hash } { print }' "$SHADOW" > "$DIR/new"
mv "$DIR/new" "$SHADOW""#,
        );
        let account = fixture.backend.resolve(Some(&Fixture::name("lapsadmin"))).unwrap();
        let password = Password::new("Correct-Horse-1".to_owned());
        let hash = PasswordHash::new(&password, HashRounds::default());

        fixture.set(&account, &hash).unwrap();

        assert_eq!(fixture.backend.password_hash(&account).unwrap(), hash.as_str());
        assert!(fixture.backend.verify_password(&account, &password).unwrap());
        let argv = fs::read_to_string(fixture.dir.path().join("argv")).unwrap();
        assert_eq!(argv, "-e\n", "only -e is in argv, never the hash");
        let toor = fixture.backend.resolve(None).unwrap();
        assert_eq!(fixture.backend.password_hash(&toor).unwrap(), "$6$salt$roothash");
    }

    #[test]
    fn a_failing_chpasswd_is_an_error_with_its_stderr_cut_short() {
        let fixture =
            Fixture::with_script("cat > /dev/null\nprintf 'chpasswd: cannot lock /etc/shadow%0600d' 0 >&2\nexit 1");
        let account = fixture.backend.resolve(Some(&Fixture::name("lapsadmin"))).unwrap();
        let hash = PasswordHash::new(&Password::new("Correct-Horse-1".to_owned()), HashRounds::default());

        let err = fixture.set(&account, &hash).unwrap_err();

        let message = err.to_string();
        assert!(message.contains("chpasswd: cannot lock /etc/shadow"), "{message}");
        assert!(message.len() < 400, "stderr is cut: {} bytes", message.len());
        assert!(!message.contains(hash.as_str()));
        assert_eq!(fixture.backend.password_hash(&account).unwrap(), "!*");
    }

    #[test]
    fn a_chpasswd_that_stores_nothing_is_caught_by_reading_the_hash_back() {
        let fixture = Fixture::with_script("cat > /dev/null");
        let account = fixture.backend.resolve(Some(&Fixture::name("lapsadmin"))).unwrap();
        let hash = PasswordHash::new(&Password::new("Correct-Horse-1".to_owned()), HashRounds::default());

        let err = fixture.set(&account, &hash).unwrap_err();

        assert!(err.to_string().contains("does not hold the hash that was set"), "{err}");
    }

    #[test]
    fn a_missing_chpasswd_is_named() {
        let fixture = Fixture::new("/nonexistent/chpasswd");
        let account = fixture.backend.resolve(Some(&Fixture::name("lapsadmin"))).unwrap();
        let hash = PasswordHash::new(&Password::new("Correct-Horse-1".to_owned()), HashRounds::default());

        let err = fixture.backend.set_password_hash(&account, &hash).unwrap_err();

        assert!(
            err.to_string().contains("/nonexistent/chpasswd: cannot run it"),
            "{err}"
        );
    }
}
