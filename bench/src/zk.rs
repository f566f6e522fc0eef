//! Registering endpoints in ZooKeeper the way an LB does (CONTRACT section 3): ephemeral
//! nodes `/zk/product/<product>/services/<service>/<service_id>` holding the endpoint JSON,
//! owned by one session of the harness. Many nodes are created pipelined (requests are sent
//! when issued and awaited together), so thousands take a few round trips.

use anyhow::Context;
use futures_util::future::join_all;
use rpc_registry::{EndpointInfo, endpoint_path, service_id, service_path, services_path};
use zookeeper_client as zk;

/// One session of the harness.
pub struct Zk {
    client: zk::Client,
}

// === impl Zk ===

impl Zk {
    /// Connects a session.
    ///
    /// # Errors
    /// When ZooKeeper cannot be reached.
    pub async fn connect(servers: &str) -> anyhow::Result<Zk> {
        let client = zk::Client::connector()
            .with_session_timeout(std::time::Duration::from_secs(30))
            .connect(servers)
            .await
            .with_context(|| format!("connect to zookeeper {servers}"))?;
        Ok(Zk { client })
    }

    /// Registers `(service, frontend)` endpoints of `product`, creating the parents; returns
    /// the endpoint node paths in the same order.
    ///
    /// # Errors
    /// When a node cannot be created.
    pub async fn register(
        &self,
        product: &str,
        endpoints: &[(String, String)],
    ) -> anyhow::Result<Vec<String>> {
        let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        self.client
            .mkdir(&services_path(product), &dir)
            .await
            .context("mkdir services")?;
        let mut services: Vec<&str> = endpoints.iter().map(|(s, _)| s.as_str()).collect();
        services.sort_unstable();
        services.dedup();
        let paths: Vec<String> = services.iter().map(|s| service_path(product, s)).collect();
        let created = join_all(paths.iter().map(|p| self.client.create(p, b"", &dir))).await;
        for (path, result) in paths.iter().zip(created) {
            match result {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(e).with_context(|| format!("create {path}")),
            }
        }
        let nodes: Vec<(String, Vec<u8>)> = endpoints
            .iter()
            .map(|(service, frontend)| {
                let info = endpoint_info(service, frontend);
                let path = endpoint_path(product, service, &info.service_id);
                (path, serde_json::to_vec(&info).unwrap_or_default())
            })
            .collect();
        let created = join_all(nodes.iter().map(|(p, d)| self.create_ephemeral(p, d))).await;
        for ((path, _), result) in nodes.iter().zip(created) {
            result.with_context(|| format!("create {path}"))?;
        }
        Ok(nodes.into_iter().map(|(p, _)| p).collect())
    }

    /// Registers one endpoint again after [`Zk::delete`].
    ///
    /// # Errors
    /// When the node cannot be created.
    pub async fn reregister(
        &self,
        product: &str,
        service: &str,
        frontend: &str,
    ) -> anyhow::Result<()> {
        let info = endpoint_info(service, frontend);
        let path = endpoint_path(product, service, &info.service_id);
        let data = serde_json::to_vec(&info)?;
        self.create_ephemeral(&path, &data)
            .await
            .with_context(|| format!("create {path}"))
    }

    /// Deletes a node.
    ///
    /// # Errors
    /// When the delete fails.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.client
            .delete(path, None)
            .await
            .with_context(|| format!("delete {path}"))
    }

    /// Arms a children watch on `path` (the watcher fires when a child is deleted or added).
    ///
    /// # Errors
    /// When the node cannot be read.
    pub async fn watch_children(&self, path: &str) -> anyhow::Result<zk::OneshotWatcher> {
        let (_, _, watcher) = self
            .client
            .get_and_watch_children(path)
            .await
            .with_context(|| format!("watch {path}"))?;
        Ok(watcher)
    }

    /// Reads every endpoint of `product` as a proxy's discovery does, requests pipelined
    /// (list the services; list each; get each endpoint's data): three round trips whatever
    /// the number of nodes. Returns the number of endpoints read.
    ///
    /// # Errors
    /// When a read fails.
    pub async fn read_all(&self, product: &str) -> anyhow::Result<usize> {
        let services = self.client.list_children(&services_path(product)).await?;
        let paths: Vec<String> = services.iter().map(|s| service_path(product, s)).collect();
        let lists = join_all(paths.iter().map(|p| self.client.list_children(p))).await;
        let mut nodes = Vec::new();
        for (service, list) in services.iter().zip(lists) {
            for node in list? {
                nodes.push(endpoint_path(product, service, &node));
            }
        }
        let datas = join_all(nodes.iter().map(|p| self.client.get_data(p))).await;
        let mut read = 0;
        for data in datas {
            let (bytes, _) = data?;
            serde_json::from_slice::<EndpointInfo>(&bytes)?;
            read += 1;
        }
        Ok(read)
    }

    async fn create_ephemeral(&self, path: &str, data: &[u8]) -> Result<(), zk::Error> {
        let node = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        self.client.create(path, data, &node).await.map(|_| ())
    }
}

/// The node data an LB would write for `frontend`.
fn endpoint_info(service: &str, frontend: &str) -> EndpointInfo {
    EndpointInfo {
        service: service.to_owned(),
        service_id: service_id(frontend),
        frontend: frontend.to_owned(),
        deploy_path: "/bench".to_owned(),
        code_url_version: "bench".to_owned(),
        hostname: "localhost".to_owned(),
        start_time: rpc_registry::now_start_time(),
        // A plain Thrift server: its exceptions carry no marks.
        marks: 0,
    }
}
