//! ZooKeeper digest authentication (`zk_auth`) against a real server: the LB's nodes are
//! readable by anyone (proxies discover without a credential), and only holders of the
//! credential can create or delete endpoint nodes under the service.

mod common;

use std::time::Duration;

use common::{client, info, settings};
use rpc_registry::{Registration, endpoint_path, service_path};
use rpc_testkit::ZkServer;
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
async fn only_credential_holders_write_endpoint_nodes() {
    common::init_tracing();
    let zk = ZkServer::start();
    let servers = zk.connect_string();
    let mut secured = settings(&servers, Duration::from_secs(10));
    secured.auth = Some("lb:s3cret".to_owned());
    let reg = Registration::register(secured, PRODUCT.into(), info("echo", "10.0.0.1:5555"))
        .await
        .expect("registers with a credential");
    let path = endpoint_path(PRODUCT, "echo", "10_0_0_1_5555");

    // A reader without a credential (the proxy) sees the node and its data.
    let anonymous = client(&servers).await;
    let (data, _) = anonymous
        .get_data(&path)
        .await
        .expect("anyone reads the endpoint");
    assert!(String::from_utf8_lossy(&data).contains("10.0.0.1:5555"));
    let children = anonymous
        .list_children(&service_path(PRODUCT, "echo"))
        .await
        .unwrap();
    assert_eq!(children, vec!["10_0_0_1_5555".to_owned()]);

    // Without the credential: no delete, no new endpoint under the service.
    let open = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let intruder = endpoint_path(PRODUCT, "echo", "6_6_6_6_666");
    assert_eq!(anonymous.delete(&path, None).await, Err(zk::Error::NoAuth));
    assert_eq!(
        anonymous.create(&intruder, b"{}", &open).await.err(),
        Some(zk::Error::NoAuth)
    );
    let wrong = client_with_auth(&servers, "lb:guess").await;
    assert_eq!(wrong.delete(&path, None).await, Err(zk::Error::NoAuth));

    // With the credential: another LB of the product may register next to it.
    let peer = client_with_auth(&servers, "lb:s3cret").await;
    peer.create(&intruder, b"{}", &open)
        .await
        .expect("holder creates an endpoint");
    peer.delete(&intruder, None)
        .await
        .expect("holder deletes it");

    reg.deregister().await.expect("deregisters its own node");
    assert_eq!(
        anonymous.get_data(&path).await.err(),
        Some(zk::Error::NoNode)
    );
}
