//! Connected clients by id, so links and fan-out can reach them.
//!
//! Sharded by client id: an insert, removal or lookup locks one of
//! [`SHARDS`] small maps, never a global lock. Iteration (drain) walks the
//! shards one at a time and never holds two locks.

use std::collections::HashMap;
use std::sync::Arc;

use edgegate_link::proto::ClientId;
use parking_lot::{Mutex, MutexGuard};

use crate::outbox::ClientHandle;

/// 256 shards: at 2 M clients a shard holds ~8k entries, and two workers
/// contend on the same shard rarely.
pub const SHARDS: usize = 256;

/// Every client past the upgrade.
#[derive(Debug)]
pub struct ClientRegistry {
    shards: Box<[Mutex<Shard>]>,
}

type Shard = HashMap<ClientId, Arc<ClientHandle>>;

impl Default for ClientRegistry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl ClientRegistry {
    fn shard(&self, id: ClientId) -> MutexGuard<'_, Shard> {
        // Ids are sequential, so the low bits spread evenly.
        self.shards[(id as usize) % SHARDS].lock()
    }

    pub fn insert(&self, handle: Arc<ClientHandle>) {
        self.shard(handle.id).insert(handle.id, handle);
    }

    pub fn remove(&self, id: ClientId) {
        self.shard(id).remove(&id);
    }

    pub fn get(&self, id: ClientId) -> Option<Arc<ClientHandle>> {
        self.shard(id).get(&id).cloned()
    }

    /// Number of clients (sums the shards; for status lines, not hot paths).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The clients of shard `i` at this moment. Callers walking every shard
    /// (drain) yield between shards: at 2 M clients a shard holds ~8k
    /// entries, ~50 µs to copy, while the whole registry would hold a worker
    /// for tens of milliseconds.
    pub fn shard_snapshot(&self, i: usize) -> Vec<Arc<ClientHandle>> {
        self.shards[i % SHARDS].lock().values().cloned().collect()
    }

    /// The clients of shard `i` for which `pred` holds (e.g. those bound to
    /// one link), copied out so the caller acts on them without the lock.
    pub fn shard_matching(
        &self,
        i: usize,
        mut pred: impl FnMut(&ClientHandle) -> bool,
    ) -> Vec<Arc<ClientHandle>> {
        self.shards[i % SHARDS]
            .lock()
            .values()
            .filter(|c| pred(c))
            .cloned()
            .collect()
    }
}

/// Connections per client address, for `limits.max_clients_per_address`.
/// Sharded like the registry; an address's entry is removed when its count
/// returns to zero, so memory follows the addresses connected now.
#[derive(Debug)]
pub struct AddressCounts {
    shards: Box<[Mutex<HashMap<std::net::IpAddr, u32>>]>,
}

impl Default for AddressCounts {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl AddressCounts {
    fn shard(&self, ip: std::net::IpAddr) -> MutexGuard<'_, HashMap<std::net::IpAddr, u32>> {
        let i = match ip {
            std::net::IpAddr::V4(v4) => u32::from(v4) as usize,
            std::net::IpAddr::V6(v6) => {
                (u128::from(v6) as usize) ^ ((u128::from(v6) >> 64) as usize)
            }
        };
        self.shards[i % SHARDS].lock()
    }

    /// Counts a connection from `ip` unless it already has `max`.
    pub fn try_take(&self, ip: std::net::IpAddr, max: u32) -> bool {
        let mut shard = self.shard(ip);
        let n = shard.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                shard.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// Forgets one connection from `ip` (saturating: a limit enabled by a
    /// reload did not count the connections that were already there).
    pub fn release(&self, ip: std::net::IpAddr) {
        let mut shard = self.shard(ip);
        if let Some(n) = shard.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shard.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_counts_cap_one_address_and_forget_it_at_zero() {
        let a = AddressCounts::default();
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        assert!(a.try_take(ip, 2) && a.try_take(ip, 2));
        assert!(!a.try_take(ip, 2));
        assert!(a.try_take("192.0.2.2".parse().unwrap(), 2));
        a.release(ip);
        assert!(a.try_take(ip, 2));
        a.release(ip);
        a.release(ip);
        a.release(ip); // saturates
        assert!(a.shard(ip).get(&ip).is_none());
    }
}
