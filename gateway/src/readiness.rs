//! Whether the gateway is ready for clients, by one rule for every place
//! that answers it: the admin endpoint's `/readyz` (every service) and a
//! client listener's optional `health_path` (the services that listener
//! routes to), for load balancers that can probe only the client port.
//!
//! Ready means: not leaving or draining, and every service in question has
//! at least one link up. A service with some instances unlinked is still
//! served (by the others) and is named, so the operator sees "2 of 3".

use std::sync::Arc;

use crate::links::ServicePool;
use crate::state::Lifecycle;

/// Why the answer is "not ready".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    Draining,
    NoLink { service: String, instances: usize },
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Draining => f.write_str("draining"),
            NotReady::NoLink { service, instances } => write!(
                f,
                "service {service} has no link up (0 of {instances} instances linked)"
            ),
        }
    }
}

/// A service that is served, but not by all of its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degraded {
    pub service: String,
    pub linked: usize,
    pub instances: usize,
}

impl std::fmt::Display for Degraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "service {}: {} of {} instances linked",
            self.service, self.linked, self.instances
        )
    }
}

/// `Ok` when ready for clients of `pools`, naming each service with
/// instances unlinked.
///
/// # Errors
/// The first reason it is not.
pub fn readiness<'a>(
    lifecycle: &Lifecycle,
    pools: impl IntoIterator<Item = &'a Arc<ServicePool>> + Clone,
) -> Result<Vec<Degraded>, NotReady> {
    if lifecycle.is_leaving() {
        return Err(NotReady::Draining);
    }
    if let Some(p) = pools.clone().into_iter().find(|p| p.links_up() == 0) {
        return Err(NotReady::NoLink {
            service: p.name.to_string(),
            instances: p.instances(),
        });
    }
    Ok(pools
        .into_iter()
        .filter(|p| p.instances_linked() < p.instances())
        .map(|p| Degraded {
            service: p.name.to_string(),
            linked: p.instances_linked(),
            instances: p.instances(),
        })
        .collect())
}
