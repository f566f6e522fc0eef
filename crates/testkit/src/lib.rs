//! Test support for the workspace's integration tests (never shipped): a throwaway
//! ZooKeeper server ([`ZkServer`]) and bounded polling waits ([`wait_until`],
//! [`wait_until_async`], [`eventually!`]) so tests synchronise on conditions, not on sleeps.
//!
//! # Layout
//! - `zk`: [`ZkServer`], a standalone ZooKeeper from Debian's `zookeeper` package
//!   (`/usr/share/java/zookeeper.jar`, or the jar named by `RPC_TEST_ZK_JAR`).
//! - `wait`: the polling helpers.

mod wait;
mod zk;

pub use wait::{patience, wait_until, wait_until_async};
pub use zk::{ZK_JAR_ENV, ZkServer};
