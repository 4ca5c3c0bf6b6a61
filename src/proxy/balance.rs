//! Which API server gets the next request. The supervisor turns the API services'
//! states into one table, [`Routes`] (the loopback ports of the servers that are
//! ready now), published through a watch channel ([`publish`]); the proxy only reads
//! it and picks a port round robin per request. An update swap changes an
//! instance's port in one step: requests that already started finish on the old
//! server (which then drains), new ones go to the new port.

use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::select_all;
use tokio::sync::watch;

use crate::process::state::ServiceState;

/// The API servers that may get traffic now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Ports of the ready API servers, in instance order.
    pub ready: Vec<u16>,
    /// Every API service is stopped by the operator: requests need not wait.
    pub held: bool,
}

impl Routes {
    fn of(states: &[watch::Receiver<ServiceState>]) -> Routes {
        let mut ready = Vec::new();
        let mut held = !states.is_empty();
        for rx in states {
            let s = rx.borrow();
            if s.ready() {
                if let Some(p) = s.port {
                    ready.push(p);
                }
            }
            held &= s.held;
        }
        Routes { ready, held }
    }
}

/// Follows the services' states and publishes the routing table (until every
/// service task is gone).
pub fn publish(
    mut states: Vec<watch::Receiver<ServiceState>>,
) -> (
    watch::Receiver<Routes>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = watch::channel(Routes::of(&states));
    let task = async move {
        loop {
            if states.is_empty() {
                return;
            }
            let changed = states.iter_mut().map(|r| Box::pin(r.changed()));
            let (r, _, _) = select_all(changed).await;
            if r.is_err() {
                return;
            }
            let routes = Routes::of(&states);
            tx.send_if_modified(|cur| {
                let differs = *cur != routes;
                if differs {
                    *cur = routes;
                }
                differs
            });
        }
    };
    (rx, task)
}

/// Round robin over the ready servers.
#[derive(Default)]
pub struct Picker {
    next: AtomicUsize,
}

impl Picker {
    /// The port for the next request; `avoid` (a server that just failed) is skipped
    /// when another one is ready.
    pub fn pick(&self, routes: &watch::Receiver<Routes>, avoid: Option<u16>) -> Option<u16> {
        let r = routes.borrow();
        let candidates: Vec<u16> = match avoid {
            Some(a) if r.ready.iter().any(|p| *p != a) => {
                r.ready.iter().copied().filter(|p| *p != a).collect()
            }
            _ => r.ready.clone(),
        };
        if candidates.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(candidates[i % candidates.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::state::Phase;

    fn state(port: u16, ready: bool) -> ServiceState {
        let mut s = ServiceState::new("api");
        if ready {
            s.set(Phase::Ready, Some(1));
            s.port = Some(port);
        }
        s
    }

    #[tokio::test]
    async fn routes_follow_states_and_picker_rotates() {
        let (a_tx, a_rx) = watch::channel(state(1000, true));
        let (b_tx, b_rx) = watch::channel(state(1001, false));
        let (mut routes, task) = publish(vec![a_rx, b_rx]);
        let task = tokio::spawn(task);
        assert_eq!(routes.borrow().ready, vec![1000]);
        b_tx.send_modify(|s| *s = state(1001, true));
        let r = routes
            .wait_for(|r| r.ready.len() == 2)
            .await
            .map(|r| r.clone());
        assert_eq!(r.ok().map(|r| r.ready), Some(vec![1000, 1001]));
        let p = Picker::default();
        let picks: Vec<Option<u16>> = (0..4).map(|_| p.pick(&routes, None)).collect();
        assert_eq!(picks.iter().filter(|x| **x == Some(1000)).count(), 2);
        assert_eq!(p.pick(&routes, Some(1000)), Some(1001));
        // The swap: instance a moves to its spare port in one step.
        a_tx.send_modify(|s| s.port = Some(1002));
        let r = routes
            .wait_for(|r| r.ready.contains(&1002))
            .await
            .map(|r| r.clone());
        assert_eq!(r.ok().map(|r| r.ready), Some(vec![1002, 1001]));
        drop(a_tx);
        drop(b_tx);
        let _ = task.await;
    }
}
