//! Bad configuration stops the binaries with a message naming the field and what is allowed.

use fleetlaps_proto::seal::EscrowSecretKey;

use crate::apps::run_blocking as run;

#[test]
fn an_out_of_range_policy_stops_the_agent_naming_the_setting_and_the_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (line, expected) in [
        ("PasswordLength = 7", "PasswordLength = 7: allowed 8 to 64"),
        ("PasswordComplexity = 9", "PasswordComplexity = 9: allowed 1 to 8"),
        (
            "PostAuthenticationActions = 2",
            "PostAuthenticationActions = 2: allowed 1, 3, 5 or 11",
        ),
    ] {
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nescrow_public_key = \"{}\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\n[account]\nbackend = \"file\"\npath = \"/nonexistent\"\n[policy]\n{line}\n",
                dir.path().join("state").display(),
                EscrowSecretKey::generate().public_key()
            ),
        )
        .expect("writing config");
        let output = run("fleetlaps-agent", &["--config", config.to_str().expect("utf-8"), "run"]);
        assert!(!output.status.success(), "the agent must refuse {line}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(expected),
            "stderr names the setting and range for {line}: {stderr}"
        );
        assert!(
            !dir.path().join("state").exists(),
            "nothing is half-applied: no state was created"
        );
    }
}

#[test]
fn an_unknown_field_stops_the_orchestrator_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &config,
        "data_dir = \"/tmp/x\"\nlisten_port = 80\n[nats]\nurl = \"nats://127.0.0.1:1\"\n",
    )
    .expect("writing config");
    let output = run(
        "fleetlaps-orchestrator",
        &["run", "--config", config.to_str().expect("utf-8")],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listen_port"), "{stderr}");
}
