//! Per-client-IP guards: a token-bucket request rate (→ 429 + Retry-After) and a
//! cap on open connections. Both forget idle clients so memory stays bounded.

use crate::sync::LockExt;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clients tracked before idle entries are swept.
const SWEEP_AT: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token bucket per client address: `rate` per second on average, `burst` at once.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token; `Err(retry_after)` when the client is over its rate.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut map = self.buckets.locked();
        if map.len() >= SWEEP_AT {
            // Full buckets carry no information: drop them.
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = map.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

/// Open connections per client address.
#[derive(Clone)]
pub struct ConnLimiter {
    max: u32,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

/// Held for the life of a connection; releases its slot on drop.
pub struct ConnSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl ConnLimiter {
    pub fn new(max: u32) -> ConnLimiter {
        ConnLimiter {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for a new connection from `ip`, or None when it has too many open.
    pub fn acquire(&self, ip: IpAddr) -> Option<ConnSlot> {
        let mut map = self.open.locked();
        let n = map.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            ip,
            open: self.open.clone(),
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        {
            let mut map = self.open.locked();
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_limits() {
        let r = RateLimiter::new(10, 5);
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..5 {
            assert!(r.check(ip).is_ok());
        }
        let wait = r.check(ip).expect_err("over the burst");
        assert!(wait <= Duration::from_millis(101), "{wait:?}");
        // Another client has its own bucket.
        assert!(r.check([10, 0, 0, 2].into()).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(r.check(ip).is_ok(), "refilled");
    }

    #[test]
    fn zero_rate_means_unlimited() {
        let r = RateLimiter::new(0, 0);
        for _ in 0..10_000 {
            assert!(r.check([10, 0, 0, 1].into()).is_ok());
        }
    }

    #[test]
    fn connection_slots_are_released() {
        let c = ConnLimiter::new(2);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = c.acquire(ip).expect("1");
        let _b = c.acquire(ip).expect("2");
        assert!(c.acquire(ip).is_none());
        drop(a);
        assert!(c.acquire(ip).is_some());
    }
}
