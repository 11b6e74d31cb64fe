//! Walks every RPC of the contract (from the compiled descriptor, so a new
//! RPC is covered without editing this file): without a credential, with a
//! garbage bearer, and with a forged token, each answers UNAUTHENTICATED
//! before any handler runs — except the two public RPCs.

use tonic::Code;
use vaultguard_tests::TestServer;
use vaultguard_tests::contract::{call_empty, every_method};

const PUBLIC: [&str; 2] = [
    "/vaultguard.v1.AuthService/IssueToken",
    "/vaultguard.v1.IssuerKeyService/GetJwks",
];

/// A token with VaultGuard's issuer and a real key id, but a forged signature.
async fn forged_token(server: &TestServer) -> String {
    use base64::Engine;
    let genuine = server
        .mint("operator", None, &[vaultguard_client::pb::Role::Operator])
        .await;
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let forged_signature = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 256]);
    parts[2] = &forged_signature;
    parts.join(".")
}

#[tokio::test]
async fn every_rpc_refuses_missing_garbage_and_forged_credentials() {
    let server = TestServer::start().await;
    let methods = every_method();
    assert!(
        methods.len() >= 61,
        "the contract has every service: {}",
        methods.len()
    );
    let forged = forged_token(&server).await;
    let audit_before = server.count("audit_events").await;
    for method in &methods {
        if PUBLIC.contains(&method.path.as_str()) {
            continue;
        }
        for bearer in [None, Some("garbage"), Some("a.b.c"), Some(forged.as_str())] {
            let result = call_empty(&server, &method.path, method.server_streaming, bearer).await;
            let status = result.expect_err(&format!("{} must refuse {bearer:?}", method.path));
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{} with {bearer:?}: {status:?}",
                method.path
            );
        }
    }
    assert_eq!(
        server.count("audit_events").await,
        audit_before,
        "refused calls write nothing"
    );
    server.stop().await;
}

#[tokio::test]
async fn public_rpcs_answer_without_credentials_and_every_response_has_a_request_id() {
    let server = TestServer::start().await;
    let anonymous = server.anonymous().await;
    let jwks = anonymous
        .issuer_keys()
        .get_jwks(vaultguard_client::pb::GetJwksRequest {})
        .await
        .unwrap();
    assert!(jwks.metadata().get("x-request-id").is_some());
    let refused = anonymous
        .tenants()
        .list_tenants(vaultguard_client::pb::ListTenantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.metadata().get("x-request-id").is_some(),
        "errors carry x-request-id too"
    );
    // A caller-supplied request id is kept.
    let mut request = tonic::Request::new(vaultguard_client::pb::GetJwksRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "trace-123".parse().unwrap());
    let echoed = anonymous.issuer_keys().get_jwks(request).await.unwrap();
    assert_eq!(echoed.metadata().get("x-request-id").unwrap(), "trace-123");
    server.stop().await;
}
