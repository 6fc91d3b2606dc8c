//! TEST ONLY. A batch message filter (`batch-message-filter`) that misbehaves on purpose, so
//! the gateway's tests can show what its failures cost. `mode` in its config:
//!
//! | mode | answer |
//! |---|---|
//! | `allow` | allow every message |
//! | `trap-on-boom` | panics (a trap) when any message of the batch contains "boom" |
//! | `short` | one verdict fewer than there are messages |
//! | `garbage-first` | rewrites the batch's first message with invalid JSON, allows the rest |
//! | `count` | denies every message with the reason `"i of n"`: its place in the batch |

use std::cell::RefCell;

wit_bindgen::generate!({ world: "batch-message-filter", path: "../../wit" });

use exports::switchboard::policy::batch_filter::{Batch, Guest, Verdict};

thread_local! {
    static MODE: RefCell<String> = RefCell::new(String::from("allow"));
}

struct HostileBatch;

impl Guest for HostileBatch {
    fn init(config: String) -> Result<(), String> {
        let value: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let mode = value["mode"].as_str().unwrap_or("allow").to_string();
        MODE.with(|m| *m.borrow_mut() = mode);
        Ok(())
    }

    fn filter_batch(batch: Batch) -> Vec<Verdict> {
        let n = batch.messages.len();
        let data = |i: usize| {
            let span = batch.messages[i].data;
            &batch.text[span.offset as usize..][..span.len as usize]
        };
        match MODE.with(|m| m.borrow().clone()).as_str() {
            "trap-on-boom" if (0..n).any(|i| data(i).contains("boom")) => panic!("boom"),
            "short" => vec![Verdict::Allow; n.saturating_sub(1)],
            "garbage-first" => {
                (0..n).map(|i| if i == 0 { Verdict::Rewrite("{not json".into()) } else { Verdict::Allow }).collect()
            }
            "count" => (0..n).map(|i| Verdict::Deny(format!("{} of {n}", i + 1))).collect(),
            _ => vec![Verdict::Allow; n],
        }
    }
}

export!(HostileBatch);
