//! The three kinds of call, with what the gateway passes in and what it accepts back.
//! Everything a plugin returns is checked here: a plugin that returns garbage fails the
//! call (`invalid_output`) instead of reaching clients.

use serde_json::value::RawValue;

use super::bindings::{auth, batch_filter, filter, routing, types};
use super::pool::{Guest, Pool};
use super::{Failure, FailureKind};
use crate::protocol::valid_uid;
use crate::transport::Transport;

/// Metadata pairs an authenticator may attach to an identity.
const MAX_METADATA: usize = 32;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;
/// Longest rejection code / deny reason passed on to a client.
const MAX_CODE: usize = 64;
const MAX_REASON: usize = 256;
/// Bytes an authenticator may hand back (identity, metadata, rejection) before its answer
/// is refused unread: a little over what the limits above allow.
const AUTH_FUEL: usize = 64 * 1024;
/// Extra bytes a call may hand back beyond its payload (reasons, error messages).
const FUEL_SLACK: usize = 16 * 1024;
/// Messages in one `filter-batch` call at most (a session hands over at most 12 at once;
/// a push to many users is cut into calls of this many).
const BATCH_MESSAGES: usize = 16;
/// The `data` bytes of one `filter-batch` call at most, unless one message alone is
/// larger: what a filter might rewrite in one call, held in its memory at once, stays
/// about what one large message costs it.
const BATCH_DATA_BYTES: usize = 256 * 1024;

fn pairs(list: &[(String, String)]) -> Vec<types::PairParam<'_>> {
    list.iter().map(|(k, v)| types::PairParam { key: k, value: v }).collect()
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(FailureKind::InvalidOutput, message.into())
}

/// What an authenticator sees of a connection attempt.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    pub app_id: &'a str,
    pub token: &'a str,
    pub transport: Transport,
    pub remote_addr: &'a str,
    pub params: &'a [(String, String)],
    pub verified_uid: Option<&'a str>,
}

/// An authenticator's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Accept { uid: String, metadata: Vec<(String, String)> },
    Reject { code: String, message: String },
}

/// A message as filters see it.
#[derive(Debug, Clone, Copy)]
pub struct FilterMessage<'a> {
    pub app_id: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub event: u16,
    pub data: &'a RawValue,
    pub msg_id: &'a str,
    pub send_at: u64,
    pub sender_metadata: &'a [(String, String)],
}

/// A filter's answer.
#[derive(Debug, Clone)]
pub enum Verdict {
    Allow,
    Deny(String),
    /// Valid JSON, within the size limit.
    Rewrite(Box<RawValue>),
}

/// The text a batch's strings are spans of. A string that is the very one the entry before
/// had in the same field (a push's data and message id) is not copied twice.
struct Spans {
    text: String,
    /// Per field: the last string put (address, length) and its span.
    last: [Option<(usize, usize, batch_filter::Span)>; 3],
}

impl Spans {
    fn put(&mut self, field: usize, s: &str) -> batch_filter::Span {
        let key = (s.as_ptr() as usize, s.len());
        if let Some((ptr, len, span)) = self.last[field]
            && (ptr, len) == key
        {
            return span;
        }
        // Offsets past u32::MAX are refused before the call (the caller checks the length).
        let span = batch_filter::Span { offset: self.text.len() as u32, len: s.len() as u32 };
        self.text.push_str(s);
        self.last[field] = Some((key.0, key.1, span));
        span
    }
}

/// A user to place, as routers see it.
#[derive(Debug, Clone, Default)]
pub struct RouteUser {
    pub uid: String,
    pub region: Option<String>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub metadata: Vec<(String, String)>,
}

/// A node users can be placed on.
#[derive(Debug, Clone, Default)]
pub struct RouteNode {
    pub id: String,
    pub region: Option<String>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub connections: u64,
    pub capacity: u64,
    pub draining: bool,
}

impl Pool {
    fn expect_world<'g, T>(
        &self,
        guest: &'g Guest,
        pick: impl FnOnce(&'g Guest) -> Option<&'g T>,
    ) -> wasmtime::Result<&'g T> {
        pick(guest)
            .ok_or_else(|| wasmtime::format_err!("plugin {} is not of the world this call needs", self.plugin.name))
    }

    pub fn authenticate(&self, req: &AuthRequest<'_>) -> Result<AuthOutcome, Failure> {
        let params = pairs(req.params);
        let request = auth::ConnectRequest {
            app_id: req.app_id,
            token: req.token,
            transport: match req.transport {
                Transport::Tcp => types::Transport::Tcp,
                Transport::Ws => types::Transport::Ws,
                Transport::Wss => types::Transport::Wss,
            },
            remote_addr: req.remote_addr,
            params: &params,
            verified_uid: req.verified_uid,
        };
        let answer = self.call(AUTH_FUEL, |guest, store| {
            let g = self.expect_world(guest, |g| if let Guest::Auth(a) = g { Some(a) } else { None })?;
            g.call_authenticate(store, request)
        })?;
        match answer {
            Ok(identity) => {
                if !valid_uid(&identity.uid) {
                    return Err(
                        self.invalid_output("returned a uid that is empty, over 128 bytes or has control characters")
                    );
                }
                if let Some(verified) = req.verified_uid
                    && verified != identity.uid
                {
                    return Err(self.invalid_output("changed the user id the JWT established"));
                }
                if identity.metadata.len() > MAX_METADATA
                    || identity.metadata.iter().any(|p| {
                        p.key.is_empty() || p.key.len() > MAX_METADATA_KEY || p.value.len() > MAX_METADATA_VALUE
                    })
                {
                    return Err(self
                        .invalid_output("returned metadata over its limits (32 pairs, keys 1-64, values 512 bytes)"));
                }
                let metadata = identity.metadata.into_iter().map(|p| (p.key, p.value)).collect();
                Ok(AuthOutcome::Accept { uid: identity.uid, metadata })
            }
            Err(rejection) => {
                self.count_denial();
                Ok(AuthOutcome::Reject {
                    code: truncate(rejection.code, MAX_CODE),
                    message: truncate(rejection.message, MAX_REASON),
                })
            }
        }
    }

    /// Filters one message. A rewrite must be valid JSON of at most `max_bytes`.
    pub fn filter(&self, m: &FilterMessage<'_>, max_bytes: usize) -> Result<Verdict, Failure> {
        let metadata = pairs(m.sender_metadata);
        let message = filter::Message {
            app_id: m.app_id,
            from: m.from,
            to: m.to,
            event: m.event,
            data: m.data.get(),
            msg_id: m.msg_id,
            send_at: m.send_at,
            sender_metadata: &metadata,
        };
        let verdict = self.call(max_bytes + FUEL_SLACK, |guest, store| {
            let g = self.expect_world(guest, |g| if let Guest::Filter(f) = g { Some(f) } else { None })?;
            g.call_filter(store, message)
        })?;
        self.verdict(verdict, max_bytes)
    }

    /// Filters messages of one sender (one app, one `from`, one connection's metadata), in
    /// order: one verdict or failure per message. A `batch-filter` plugin is called once per
    /// [`BATCH_MESSAGES`] of them (fewer when their data passes [`BATCH_DATA_BYTES`]), and a
    /// failed call fails every message in it; any other filter is called once per message.
    pub fn filter_many(&self, msgs: &[FilterMessage<'_>], max_bytes: usize) -> Vec<Result<Verdict, Failure>> {
        if !self.plugin.takes_batches() {
            return msgs.iter().map(|m| self.filter(m, max_bytes)).collect();
        }
        debug_assert!(msgs.iter().all(|m| m.app_id == msgs[0].app_id
            && m.from == msgs[0].from
            && m.sender_metadata == msgs[0].sender_metadata));
        let mut answers = Vec::with_capacity(msgs.len());
        let mut rest = msgs;
        while !rest.is_empty() {
            let mut bytes = 0;
            let n = rest
                .iter()
                .take(BATCH_MESSAGES)
                .take_while(|m| {
                    bytes += m.data.get().len();
                    bytes <= BATCH_DATA_BYTES
                })
                .count()
                .max(1);
            let (batch, after) = rest.split_at(n);
            match self.filter_batch(batch, max_bytes) {
                Ok(verdicts) => answers.extend(verdicts.into_iter().map(|v| self.verdict(v, max_bytes))),
                Err(failure) => answers.extend(std::iter::repeat_n(Err(failure), n)),
            }
            rest = after;
        }
        answers
    }

    /// One `filter-batch` call over `msgs` (not empty), whose shared fields are the first's.
    /// The call may take the plugin's deadline once per message, up to the longest a
    /// filter may have.
    fn filter_batch(&self, msgs: &[FilterMessage<'_>], max_bytes: usize) -> Result<Vec<filter::Verdict>, Failure> {
        let first = &msgs[0];
        let len = msgs.iter().map(|m| m.to.len() + m.data.get().len() + m.msg_id.len()).sum();
        let mut text = Spans { text: String::with_capacity(len), last: Default::default() };
        let messages: Vec<batch_filter::Entry> = msgs
            .iter()
            .map(|m| batch_filter::Entry {
                to: text.put(0, m.to),
                event: m.event,
                data: text.put(1, m.data.get()),
                msg_id: text.put(2, m.msg_id),
                send_at: m.send_at,
            })
            .collect();
        if u32::try_from(text.text.len()).is_err() {
            return Err(invalid(format!("a batch of {} messages is over 4 GiB of text", msgs.len())));
        }
        let metadata = pairs(first.sender_metadata);
        let batch = batch_filter::Batch {
            app_id: first.app_id,
            from: first.from,
            sender_metadata: &metadata,
            text: &text.text,
            messages: &messages,
        };
        let fuel = max_bytes.saturating_add(FUEL_SLACK).saturating_mul(msgs.len());
        let deadline = (self.plugin.deadline * msgs.len() as u32)
            .min(crate::config::World::MessageFilter.max_deadline())
            .max(self.plugin.deadline);
        let verdicts = self.call_within(deadline, fuel, |guest, store| {
            let g = self.expect_world(guest, |g| if let Guest::BatchFilter(f) = g { Some(f) } else { None })?;
            g.call_filter_batch(store, batch)
        })?;
        if verdicts.len() != msgs.len() {
            return Err(self.invalid_output(format!(
                "returned {} verdicts for {} messages",
                verdicts.len(),
                msgs.len()
            )));
        }
        Ok(verdicts
            .into_iter()
            .map(|v| match v {
                batch_filter::Verdict::Allow => filter::Verdict::Allow,
                batch_filter::Verdict::Deny(reason) => filter::Verdict::Deny(reason),
                batch_filter::Verdict::Rewrite(text) => filter::Verdict::Rewrite(text),
            })
            .collect())
    }

    /// Checks a filter's answer: a reason is cut to length, a rewrite must be JSON within
    /// `max_bytes`.
    fn verdict(&self, verdict: filter::Verdict, max_bytes: usize) -> Result<Verdict, Failure> {
        match verdict {
            filter::Verdict::Allow => Ok(Verdict::Allow),
            filter::Verdict::Deny(reason) => {
                self.count_denial();
                Ok(Verdict::Deny(truncate(reason, MAX_REASON)))
            }
            filter::Verdict::Rewrite(text) => {
                if text.len() > max_bytes {
                    return Err(self.invalid_output(format!(
                        "rewrote the message to {} bytes, over the {max_bytes}-byte limit",
                        text.len()
                    )));
                }
                match RawValue::from_string(text) {
                    Ok(raw) => Ok(Verdict::Rewrite(raw)),
                    Err(e) => Err(self.invalid_output(format!("rewrote the message to invalid JSON: {e}"))),
                }
            }
        }
    }

    /// One node index per user; every index is in range and names a live node.
    pub fn route(&self, app: &str, users: &[RouteUser], nodes: &[RouteNode]) -> Result<Vec<usize>, Failure> {
        let metadata: Vec<Vec<types::PairParam<'_>>> = users.iter().map(|u| pairs(&u.metadata)).collect();
        let wit_users: Vec<routing::User<'_>> = users
            .iter()
            .zip(&metadata)
            .map(|(u, m)| routing::User {
                uid: &u.uid,
                region: u.region.as_deref(),
                lat: u.lat,
                lon: u.lon,
                metadata: m,
            })
            .collect();
        let wit_nodes: Vec<routing::Node<'_>> = nodes
            .iter()
            .map(|n| routing::Node {
                id: &n.id,
                region: n.region.as_deref(),
                lat: n.lat,
                lon: n.lon,
                connections: n.connections,
                capacity: n.capacity,
                draining: n.draining,
            })
            .collect();
        let answer = self.call(users.len() * 4 + FUEL_SLACK, |guest, store| {
            let g = self.expect_world(guest, |g| if let Guest::Router(r) = g { Some(r) } else { None })?;
            g.call_route(store, app, &wit_users, &wit_nodes)
        })?;
        let indexes = answer.map_err(|message| {
            self.count_error(FailureKind::Declined);
            self.failed();
            Failure::new(FailureKind::Declined, format!("the router declined: {}", truncate(message, MAX_REASON)))
        })?;
        if indexes.len() != users.len() {
            return Err(self.invalid_output(format!(
                "returned {} node indexes for {} users",
                indexes.len(),
                users.len()
            )));
        }
        if let Some(bad) = indexes.iter().find(|&&i| i as usize >= nodes.len()) {
            return Err(self.invalid_output(format!("returned node index {bad}, but there are {} nodes", nodes.len())));
        }
        // Draining nodes are off limits, unless every node is draining.
        let any_live = nodes.iter().any(|n| !n.draining);
        if let Some(&i) = indexes.iter().find(|&&i| any_live && nodes[i as usize].draining) {
            return Err(self.invalid_output(format!("placed a user on draining node {}", nodes[i as usize].id)));
        }
        Ok(indexes.into_iter().map(|i| i as usize).collect())
    }

    fn invalid_output(&self, what: impl std::fmt::Display) -> Failure {
        self.count_error(FailureKind::InvalidOutput);
        self.failed();
        invalid(format!("plugin {} {what}", self.plugin.name))
    }
}
