use std::fs;
use std::os::unix::fs::PermissionsExt;

use chrono::Utc;
use fleetlaps_proto::audit::EscrowKeyReason;
use fleetlaps_proto::seal::{EscrowSecretKey, seal};

use super::*;

fn recorded(public_key: EscrowPublicKey) -> RecordedKey {
    RecordedKey {
        public_key,
        recorded_at: Utc::now(),
    }
}

#[test]
fn a_keyring_is_written_owner_only_and_read_back_with_its_retired_keys_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    let first = EscrowKeyring::generate();
    let first_public = first.public_key();
    let rotated = first.rotated().rotated();
    rotated.write(&path).unwrap();

    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let read = EscrowKeyring::read(&path).unwrap().expect("the file exists");
    assert_eq!(read.public_key(), rotated.public_key());
    assert_eq!(read.retired_public_keys(), rotated.retired_public_keys());
    assert_eq!(read.retired_public_keys().len(), 2);
    assert_eq!(read.retired_public_keys()[1], first_public, "oldest last");
    assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 3, "one key a line");
}

#[test]
fn a_one_line_key_file_of_an_older_version_reads_as_a_keyring_of_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    let key = EscrowSecretKey::generate();
    // The old format: base64 without a newline.
    fs::write(&path, STANDARD.encode(key.to_bytes().as_slice())).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

    let keyring = EscrowKeyring::read(&path).unwrap().expect("exists");
    assert_eq!(keyring.public_key(), key.public_key());
    assert!(keyring.retired_public_keys().is_empty());
}

#[test]
fn a_missing_file_is_no_keyring_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    assert!(EscrowKeyring::read(&path).unwrap().is_none());
    assert!(!path.exists());
}

#[test]
fn a_rewrite_replaces_the_file_whole_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    let keyring = EscrowKeyring::generate();
    keyring.write(&path).unwrap();
    let inode_before = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
    let rotated = keyring.rotated();
    rotated.write(&path).unwrap();

    let inode_after = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
    assert_ne!(inode_before, inode_after, "a new file renamed over the old one");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from(KEY_FILE)],
        "no temporary file left"
    );
    assert_eq!(
        EscrowKeyring::read(&path).unwrap().unwrap().public_key(),
        rotated.public_key()
    );
}

#[test]
fn a_key_file_readable_by_others_or_not_base64_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    EscrowKeyring::generate().write(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = EscrowKeyring::read(&path).expect_err("refused");
    assert!(err.to_string().contains("readable by others"), "{err}");

    fs::write(&path, "not a key\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let err = EscrowKeyring::read(&path).expect_err("refused");
    assert!(format!("{err:#}").contains("line 1"), "{err:#}");
}

#[test]
fn the_keyring_opens_backups_sealed_to_its_retired_keys_and_says_which_it_holds() {
    let old = EscrowKeyring::generate();
    let old_public = old.public_key();
    let sealed_to_old = seal(&old_public, b"old", b"context");
    let keyring = old.rotated();
    let sealed_to_new = seal(&keyring.public_key(), b"new", b"context");

    assert_eq!(keyring.open(&sealed_to_old, b"context").unwrap().as_slice(), b"old");
    assert_eq!(keyring.open(&sealed_to_new, b"context").unwrap().as_slice(), b"new");
    assert!(keyring.open(&sealed_to_new, b"another context").is_err());
    assert!(keyring.holds(&old_public));
    assert!(!keyring.holds(&EscrowSecretKey::generate().public_key()));
}

#[test]
fn debug_output_shows_public_keys_only() {
    let keyring = EscrowKeyring::generate().rotated();
    let text = format!("{keyring:?}");
    assert!(text.contains(&keyring.public_key().to_string()), "{text}");
    for key in keyring.keys() {
        assert!(!text.contains(&STANDARD.encode(key.to_bytes().as_slice())), "{text}");
    }
}

#[test]
fn start_creates_a_key_only_when_neither_the_file_nor_the_history_has_one() {
    assert!(matches!(check_against_history(None, None), KeyCheck::Create));
    let keyring = EscrowKeyring::generate();
    match check_against_history(Some(&keyring), None) {
        KeyCheck::Record(created) => {
            assert_eq!(created.public_key, keyring.public_key());
            assert_eq!(created.reason, EscrowKeyReason::Created);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        check_against_history(Some(&keyring), Some(&recorded(keyring.public_key()))),
        KeyCheck::Matches
    ));
}

#[test]
fn start_refuses_a_missing_or_different_key_file_when_the_history_names_a_key() {
    let recorded_key = recorded(EscrowKeyring::generate().public_key());
    match check_against_history(None, Some(&recorded_key)) {
        KeyCheck::Refuse(refused) => {
            assert!(!refused.file_exists);
            let message = refusal_message(&refused, Path::new("/data/escrow.key"));
            assert!(message.contains("/data/escrow.key is missing"), "{message}");
            assert!(message.contains(&recorded_key.public_key.to_string()), "{message}");
            assert!(
                message.contains("Restore /data/escrow.key from your backup"),
                "{message}"
            );
            assert!(message.contains("fleetlaps-orchestrator recover"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let other = EscrowKeyring::generate();
    assert!(matches!(
        check_against_history(Some(&other), Some(&recorded_key)),
        KeyCheck::Refuse(RefusedKey { file_exists: true, .. })
    ));
}

#[test]
fn start_records_the_current_key_of_a_rotation_that_stopped_before_recording_it() {
    let before = EscrowKeyring::generate();
    let recorded_key = recorded(before.public_key());
    let rotated = before.rotated();
    match check_against_history(Some(&rotated), Some(&recorded_key)) {
        KeyCheck::Record(created) => {
            assert_eq!(created.public_key, rotated.public_key());
            assert_eq!(created.previous_public_key, Some(recorded_key.public_key));
            assert_eq!(created.reason, EscrowKeyReason::Rotated);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_recovery_key_is_written_owner_only_never_over_a_file_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recovery.key");
    let public_key = create_recovery_key(&path).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(read_recovery_key(&path).unwrap().public_key(), public_key);
    let err = create_recovery_key(&path).expect_err("never overwritten");
    assert!(format!("{err:#}").contains("never overwritten"), "{err:#}");
    assert_eq!(read_recovery_key(&path).unwrap().public_key(), public_key);
}
