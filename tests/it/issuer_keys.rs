//! Issuer keys: published in JWKS over HTTP and gRPC, rotated without
//! downtime, retired keys kept until their tokens have expired.

use serde_json::Value;
use vaultguard_client::pb;
use vaultguard_tests::Rpc;
use vaultguard_tests::TestServer;

async fn http_jwks(server: &TestServer) -> Value {
    reqwest::get(format!("{}/.well-known/jwks.json", server.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

fn token_kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test]
async fn rotation_keeps_old_tokens_valid_until_they_expire() {
    let server = TestServer::start().await;
    let operator = server.operator().await;
    let acme = server.create_tenant("acme").await;
    let (_, _, agent) = server.create_agent(&acme.id, "bot").await;

    let keys = operator
        .list_issuer_keys(pb::ListIssuerKeysRequest {})
        .await
        .unwrap()
        .keys;
    assert_eq!(keys.len(), 3, "one active key per algorithm");
    assert!(
        keys.iter()
            .all(|k| k.status == pb::IssuerKeyStatus::Active as i32)
    );

    // The JWKS is the same over HTTP and gRPC, and holds no private parts.
    let jwks = http_jwks(&server).await;
    let grpc_jwks: Value = serde_json::from_str(
        &server
            .anonymous()
            .await
            .issuer_keys()
            .get_jwks(pb::GetJwksRequest {})
            .await
            .unwrap()
            .into_inner()
            .jwks_json,
    )
    .unwrap();
    assert_eq!(jwks, grpc_jwks);
    for key in jwks["keys"].as_array().unwrap() {
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(key.get(private).is_none(), "jwks leaks {private}");
        }
    }
    let discovery: Value = reqwest::get(format!(
        "{}/.well-known/openid-configuration",
        server.http_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(discovery["issuer"], server.http_url());
    assert_eq!(
        discovery["jwks_uri"],
        format!("{}/.well-known/jwks.json", server.http_url())
    );

    let old_token = agent.bearer().await.unwrap();
    let old_kid = token_kid(&old_token);
    assert!(kids(&jwks).contains(&old_kid));

    let rotated =
        vaultguard_tests::calls::rotate_issuer_key(&operator, pb::TokenAlgorithm::Rs256).await;
    let new_kid = rotated.key.unwrap().kid;
    let retired = rotated.retired.unwrap();
    assert_eq!(retired.kid, old_kid);
    assert_eq!(retired.status, pb::IssuerKeyStatus::Retired as i32);
    let publish_until =
        retired.publish_until.unwrap().seconds - retired.retire_time.unwrap().seconds;
    assert_eq!(publish_until, 86_400, "kept for the longest token lifetime");

    // Both keys are published; the old token still works; new tokens use the new key.
    let after = kids(&http_jwks(&server).await);
    assert!(after.contains(&old_kid) && after.contains(&new_kid));
    agent.who_am_i().await.unwrap();
    agent.invalidate_token().await;
    assert_eq!(token_kid(&agent.bearer().await.unwrap()), new_kid);
    agent.who_am_i().await.unwrap();

    // The rotation is audited in the platform log.
    server.wait_sealed().await;
    let rows = sea_orm::ConnectionTrait::query_all_raw(
        &server.state.db,
        sea_orm::Statement::from_string(
            sea_orm::ConnectionTrait::get_database_backend(&server.state.db),
            "SELECT subject_ids FROM audit_events WHERE tenant_id = 'platform' AND event_type = 'issuer_key.rotated'".to_owned(),
        ),
    )
    .await
    .unwrap();
    assert!(rows.iter().any(|row| {
        row.try_get::<String>("", "subject_ids")
            .unwrap()
            .contains(&old_kid)
    }));

    // A day later the retired key leaves the JWKS and its tokens are refused.
    server.clock.advance(86_401 * 1000);
    let later = kids(&http_jwks(&server).await);
    assert!(!later.contains(&old_kid));
    assert!(later.contains(&new_kid));
    let stale = server.with_bearer(&old_token).await;
    assert_eq!(
        stale.who_am_i().await.unwrap_err().code(),
        Some(tonic::Code::Unauthenticated)
    );
    server.stop().await;
}
