use std::os::unix::fs::PermissionsExt;

use super::*;

/// `UPDATE_EXPECT=1 cargo test -p fleetlaps-orchestrator nats_auth` rewrites the shipped file.
#[test]
fn the_shipped_config_is_the_rendering_of_the_example() {
    let shipped = include_str!("../../packaging/nats-server.conf");
    let rendered = ServerConfig::example().render().expect("the example renders");
    if std::env::var_os("UPDATE_EXPECT").is_some_and(|value| value == "1") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/nats-server.conf");
        fs::write(&path, &rendered).expect("writing packaging/nats-server.conf");
        return;
    }
    assert!(
        shipped == rendered,
        "packaging/nats-server.conf differs from ServerConfig::example().render(); \
         run `UPDATE_EXPECT=1 cargo test -p fleetlaps-orchestrator nats_auth` to regenerate it"
    );
}

#[test]
fn a_device_may_publish_only_its_own_events_and_read_only_its_own_subjects() {
    let device_id = DeviceId::parse("dev-1").expect("valid");
    let permissions = device_permissions(&device_id);
    assert_eq!(
        permissions.publish,
        [
            "laps.events.dev-1.>",
            "$KV.LAPS_LIVENESS.dev-1",
            "$JS.API.DIRECT.GET.LAPS_COMMANDS.laps.commands.dev-1",
            "$JS.API.DIRECT.GET.LAPS_PASSWORD_VERSIONS.laps.password_version.dev-1"
        ]
    );
    assert_eq!(
        permissions.subscribe,
        ["_INBOX_dev-1.>", "laps.commands.dev-1", "laps.confirmations.dev-1"]
    );
}

#[test]
fn the_orchestrator_may_not_delete_or_purge_streams_nor_publish_device_events() {
    let permissions = orchestrator_permissions();
    for subject in &permissions.publish {
        assert!(
            !subject.contains(".DELETE.LAPS_EVENTS") || subject.starts_with("$JS.API.CONSUMER.DELETE."),
            "{subject}"
        );
        assert!(!subject.contains("PURGE"), "{subject}");
        assert!(!subject.contains("STREAM.DELETE"), "{subject}");
        assert!(!subject.starts_with("laps.events"), "{subject}");
        // It reads the liveness bucket; only devices put heartbeats.
        assert!(!subject.starts_with("$KV."), "{subject}");
    }
    assert!(
        permissions
            .publish
            .contains(&"$JS.API.CONSUMER.MSG.NEXT.KV_LAPS_LIVENESS.*".to_owned())
    );
    assert!(permissions.publish.contains(&"laps.audit.>".to_owned()));
    assert_eq!(permissions.subscribe, ["_INBOX.>", "laps.breaches.declare"]);
    // It answers breach signals below their senders' own prefix only.
    assert!(permissions.publish.contains(&"_SIGNALS_INBOX.>".to_owned()));
    assert!(!permissions.publish.iter().any(|subject| subject.starts_with("_INBOX")));
}

#[test]
fn a_signal_sender_may_only_send_breach_signals_and_read_their_answers() {
    let permissions = signal_sender_permissions();
    assert_eq!(permissions.publish, ["laps.breaches.declare"]);
    assert_eq!(permissions.subscribe, ["_SIGNALS_INBOX.>"]);
}

#[test]
fn devices_are_rendered_sorted_each_with_its_own_user() {
    let mut config = ServerConfig::example();
    config.devices.reverse();
    let text = config.render().expect("renders");
    let first = text.find(EXAMPLE_DEVICES[0].1).expect("first device listed");
    let second = text.find(EXAMPLE_DEVICES[1].1).expect("second device listed");
    assert!(first < second);
    assert!(text.contains(&render_device_user(&config.devices[0])));
}

#[test]
fn duplicate_devices_and_shared_keys_are_refused() {
    let mut config = ServerConfig::example();
    config.devices.push(config.devices[0].clone());
    let err = config.render().expect_err("refused");
    assert!(err.to_string().contains("is listed twice"), "{err}");

    let mut config = ServerConfig::example();
    config.devices[1].nkey = config.orchestrator.clone();
    let err = config.render().expect_err("refused");
    assert!(err.to_string().contains("the orchestrator and device"), "{err}");
}

#[test]
fn device_entries_parse_and_a_seed_given_as_a_key_is_not_repeated() {
    let entry = format!("dev-1={}", EXAMPLE_DEVICES[0].1);
    let device: DeviceUser = entry.parse().expect("parses");
    assert_eq!(device.device_id.as_str(), "dev-1");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("seed");
    ensure_seed_file(&path).expect("created");
    let seed = fs::read_to_string(&path).expect("readable");
    let err = DeviceUser::parse(&format!("dev-1={}", seed.trim()), "--device #1").expect_err("a seed is no public key");
    assert!(!err.to_string().contains(seed.trim()), "{err}");
    assert!(err.to_string().contains("device dev-1"), "{err}");

    let err = DeviceUser::parse("no-separator", "--device #2").expect_err("refused");
    assert!(err.to_string().contains("--device #2"), "{err}");

    let devices = parse_devices_file(
        &format!("# enrolled\n\ndev-2={}\n", EXAMPLE_DEVICES[1].1),
        "devices.txt",
    )
    .expect("parses");
    assert_eq!(devices.len(), 1);
    let err = parse_devices_file("\nbad line\n", "devices.txt").expect_err("refused");
    assert!(err.to_string().contains("devices.txt:2"), "{err}");
}

#[test]
fn settings_that_would_need_escaping_are_refused() {
    let mut config = ServerConfig::example();
    config.listen = "0.0.0.0:4222\"\nauthorization {}".to_owned();
    assert!(config.render().is_err());
}

#[test]
fn a_seed_file_is_created_owner_only_and_read_back_without_showing_the_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("orchestrator.nk");
    let public_key = ensure_seed_file(&path).expect("created");
    assert_eq!(fs::metadata(&path).expect("exists").permissions().mode() & 0o777, 0o600);
    assert_eq!(ensure_seed_file(&path).expect("read back"), public_key);

    let seed = NkeySeed::read_file(&path).expect("readable");
    assert_eq!(seed.public_key(), &public_key);
    assert!(seed.expose_secret().starts_with("SU"));
    assert!(!format!("{seed:?}").contains(seed.expose_secret()));
}

#[test]
fn a_seed_file_readable_by_others_is_refused_naming_the_file_and_the_allowed_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("device.nk");
    ensure_seed_file(&path).expect("created");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
    let err = NkeySeed::read_file(&path).expect_err("refused");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("mode 0640"), "{message}");
    assert!(message.contains("0600 or 0400"), "{message}");

    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
    NkeySeed::read_file(&path).expect("0400 is allowed");
}

#[test]
fn a_file_without_a_user_seed_is_refused_without_quoting_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-a-seed");
    fs::write(&path, "SUsomething-secret-but-wrong\n").expect("written");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    let err = NkeySeed::read_file(&path).expect_err("refused");
    assert!(err.to_string().contains("does not hold a user nkey seed"), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[test]
fn sync_interval_always_is_rendered_only_for_servers_that_know_it() {
    let mut config = ServerConfig::example();
    config.server_version = (2, 9);
    let old = config.render().expect("renders");
    assert!(!old.contains("sync_interval"), "{old}");
    assert!(
        old.contains("acknowledges a message before it writes it to disk"),
        "{old}"
    );
    config.server_version = (2, 10);
    assert!(config.render().expect("renders").contains("  sync_interval: always\n"));
    config.server_version = (3, 0);
    assert!(config.render().expect("renders").contains("  sync_interval: always\n"));
}

#[test]
fn tls_and_limits_are_rendered() {
    let mut config = ServerConfig::example();
    let with_tls = config.render().expect("renders");
    assert!(
        with_tls.contains(
            "tls {\n  cert_file: \"/etc/nats-server/tls/server.pem\"\n  key_file: \"/etc/nats-server/tls/server-key.pem\"\n"
        ),
        "{with_tls}"
    );
    assert!(with_tls.contains(&format!("max_payload: {DEFAULT_MAX_PAYLOAD}\n")));
    assert!(with_tls.contains(&format!("max_connections: {DEFAULT_MAX_CONNECTIONS}\n")));
    assert!(with_tls.contains(&format!("max_subscriptions: {MAX_SUBSCRIPTIONS_PER_CONNECTION}\n")));
    assert!(with_tls.contains(&format!("  max_file_store: {DEFAULT_MAX_FILE_STORE_BYTES}\n")));
    // The server's limit leaves room for the stream to refuse an oversized event itself.
    assert!(i64::from(DEFAULT_MAX_PAYLOAD) > i64::from(subject::MAX_EVENT_BYTES));
    config.tls = None;
    let without = config.render().expect("renders");
    assert!(!without.contains("tls {"), "{without}");
    config.tls = Some(ServerTlsFiles {
        cert_file: PathBuf::from("/a\"b"),
        key_file: PathBuf::from("/k"),
    });
    assert!(matches!(
        config.render(),
        Err(NatsAuthError::InvalidSetting {
            setting: "tls cert_file",
            ..
        })
    ));
}

#[test]
fn server_versions_parse_from_what_nats_server_prints() {
    assert_eq!(parse_server_version("v2.9.10"), Some((2, 9)));
    assert_eq!(parse_server_version("2.10"), Some((2, 10)));
    assert_eq!(parse_server_version("2"), None);
    assert_eq!(parse_server_version("two.ten"), None);
}

#[test]
fn the_simulator_user_is_rendered_only_when_asked_with_every_device_subject_and_its_warning() {
    let mut config = ServerConfig::example();
    assert!(!config.render().expect("renders").contains("fleet simulator"));
    let simulator = NkeyPublicKey::parse(&KeyPair::new_user().public_key(), "simulator").expect("a user key");
    config.simulator = Some(simulator.clone());
    let text = config.render().expect("renders");
    assert!(text.contains(&render_simulator_user(&simulator)), "{text}");
    assert!(text.contains("NEVER IN PRODUCTION"));
    // The devices' own entries are as before.
    assert!(text.contains(&render_device_user(&config.devices[0])));
    let permissions = simulator_permissions();
    assert_eq!(
        permissions.publish,
        [
            "laps.events.*.>",
            "$KV.LAPS_LIVENESS.*",
            "$JS.API.DIRECT.GET.LAPS_COMMANDS.laps.commands.*",
            "$JS.API.DIRECT.GET.LAPS_PASSWORD_VERSIONS.laps.password_version.*"
        ]
    );
    assert_eq!(
        permissions.subscribe,
        [
            "_INBOX_fleetlaps-simulator.>",
            "laps.commands.*",
            "laps.confirmations.*"
        ]
    );

    config.simulator = Some(config.devices[0].nkey.clone());
    let err = config.render().expect_err("refused");
    assert!(
        err.to_string().contains("and the simulator have the same nkey"),
        "{err}"
    );
}
