//! ZooKeeper digest authentication (`zk_auth`, CONTRACT section 9 "ZooKeeper ACLs") against a
//! real server: an LB with a credential protects only its own ephemeral endpoint node
//! (readable by anyone, its data and ACL writable by holders of the credential). Every parent
//! it creates, the service directory included, is open (world:anyone, all permissions), so
//! that an LB without a credential (the Go original) or with another credential still
//! registers next to it. ZooKeeper checks a delete against the parent's ACL, so the open
//! service directory lets anyone delete the node: the registration then makes it again.

mod common;

use std::time::Duration;

use common::{EVENT_TIMEOUT, client, ephemeral, info, persistent, settings};
use rpc_registry::{Registration, endpoint_path, service_path, services_path};
use rpc_testkit::{ZkServer, wait_until_async};
use zookeeper_client as zk;

const PRODUCT: &str = "auth";

async fn client_with_auth(servers: &str, auth: &str) -> zk::Client {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(20))
        .with_auth("digest", auth.as_bytes())
        .connect(servers)
        .await
        .expect("authenticated test client connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_protects_only_the_lbs_own_node() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let anonymous = client(&servers).await;
    assert_eq!(
        anonymous.check_stat("/zk").await.expect("exists"),
        None,
        "the LB must be the first to register, on an empty server"
    );

    // The `zk_auth` LB registers first: it creates every parent itself.
    let mut secured = settings(&servers, Duration::from_secs(10));
    secured.auth = Some("lb:s3cret".to_owned());
    let reg = Registration::register(
        secured.clone(),
        PRODUCT.into(),
        info("echo", "10.0.0.1:5555"),
    )
    .await
    .expect("registers with a credential");
    let own = endpoint_path(PRODUCT, "echo", "10_0_0_1_5555");
    assert_eq!(reg.path(), own);

    // A client without credentials (a Go original LB): another service's directory, and an
    // endpoint node under the same service directory as the LB's.
    anonymous
        .mkdir(&service_path(PRODUCT, "other"), &persistent())
        .await
        .expect("anyone creates another service's directory");
    anonymous
        .create(
            &endpoint_path(PRODUCT, "other", "10_0_0_9_5555"),
            b"{}",
            &ephemeral(),
        )
        .await
        .expect("anyone registers another service");
    let go_lb = endpoint_path(PRODUCT, "echo", "10_0_0_2_5555");
    anonymous
        .create(&go_lb, b"{}", &ephemeral())
        .await
        .expect("anyone registers next to the LB with a credential");

    // Every parent it created is open to all.
    let open = vec![zk::Acl::new(zk::Permission::ALL, zk::AuthId::anyone())];
    let parents = [
        "/zk".to_owned(),
        "/zk/product".to_owned(),
        format!("/zk/product/{PRODUCT}"),
        services_path(PRODUCT),
        service_path(PRODUCT, "echo"),
    ];
    for parent in &parents {
        let (acls, _) = anonymous.get_acl(parent).await.expect("get_acl");
        assert_eq!(acls, open, "ACL of {parent}");
    }

    // An LB with another credential registers too.
    let mut other = secured.clone();
    other.auth = Some("other:pa55".to_owned());
    let other_reg = Registration::register(other, PRODUCT.into(), info("echo", "10.0.0.3:5555"))
        .await
        .expect("an LB with another credential registers");

    let mut children = anonymous
        .list_children(&service_path(PRODUCT, "echo"))
        .await
        .expect("anyone lists the service");
    children.sort();
    assert_eq!(
        children,
        ["10_0_0_1_5555", "10_0_0_2_5555", "10_0_0_3_5555"].map(String::from)
    );

    // The LB's own node: anyone reads it; without the credential nobody writes its data or
    // its ACL.
    let (data, stat) = anonymous
        .get_data(&own)
        .await
        .expect("anyone reads the endpoint");
    assert!(String::from_utf8_lossy(&data).contains("10.0.0.1:5555"));
    let (acls, _) = anonymous.get_acl(&own).await.expect("get_acl");
    assert!(
        acls.contains(&zk::Acl::new(zk::Permission::READ, zk::AuthId::anyone())),
        "{acls:?}"
    );
    assert!(
        acls.iter()
            .all(|acl| acl.scheme() != "world" || acl.permission() == zk::Permission::READ),
        "only reads are open: {acls:?}"
    );
    let wrong = client_with_auth(&servers, "lb:guess").await;
    for (who, intruder) in [("anonymous", &anonymous), ("wrong credential", &wrong)] {
        assert_eq!(
            intruder.set_data(&own, b"{}", None).await.err(),
            Some(zk::Error::NoAuth),
            "{who} rewrites the LB's node"
        );
        assert_eq!(
            intruder.set_acl(&own, &open, None).await.err(),
            Some(zk::Error::NoAuth),
            "{who} opens the LB's node"
        );
    }

    // A holder of the credential (another instance of the same LB, an operator) may write.
    let holder = client_with_auth(&servers, "lb:s3cret").await;
    holder
        .set_data(&own, &data, Some(stat.version))
        .await
        .expect("a holder writes the node");

    // ZooKeeper checks DELETE on the parent, which must stay open (any LB deletes its own
    // stale node there): a delete without the credential goes through, and the registration
    // makes its node again on its live session.
    let session = anonymous
        .check_stat(&own)
        .await
        .expect("exists")
        .expect("registered")
        .ephemeral_owner;
    anonymous
        .delete(&own, None)
        .await
        .expect("DELETE is the open parent's permission");
    wait_until_async(EVENT_TIMEOUT, || async {
        anonymous
            .check_stat(&own)
            .await
            .ok()
            .flatten()
            .is_some_and(|stat| stat.ephemeral_owner == session)
    })
    .await;
    let (again, _) = anonymous.get_data(&own).await.expect("registered again");
    assert_eq!(again, data, "the same endpoint data");
    let (acls_again, _) = anonymous.get_acl(&own).await.expect("get_acl");
    assert_eq!(acls_again, acls, "made again with the protected ACL");

    other_reg.deregister().await.expect("deregisters");
    reg.deregister().await.expect("deregisters its own node");
    assert_eq!(
        anonymous.get_data(&own).await.err(),
        Some(zk::Error::NoNode)
    );
    anonymous
        .check_stat(&go_lb)
        .await
        .expect("exists")
        .expect("the Go LB's node is left alone");
}
