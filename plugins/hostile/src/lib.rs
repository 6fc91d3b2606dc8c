//! TEST ONLY. A plugin that misbehaves on purpose, so the gateway's tests can show that a
//! broken plugin costs only the request it was serving. It implements all three worlds;
//! `mode` in its config picks the misbehaviour:
//!
//! | mode | filter | authenticate | route |
//! |---|---|---|---|
//! | `allow` | allow | accept the token as uid | node 0 for everyone |
//! | `loop` | spins forever | spins forever | spins forever |
//! | `hog` | allocates until memory runs out | same | same |
//! | `trap` | panics (a trap) | same | same |
//! | `trap-on-boom` | panics when the data contains "boom", else allows | | |
//! | `huge` | rewrites with a 1 MiB string | returns a 1 MiB uid | returns 1M indexes |
//! | `garbage` | rewrites with invalid JSON | returns an empty uid | returns index 99999 |
//! | `fail-init` | `init` returns an error | same | same |
//! | `show-metadata` | denies, with the sender's metadata as the reason | | |
//! | `chatty` | logs 1000 lines of 100 KiB, then allows | | |

use std::cell::RefCell;

wit_bindgen::generate!({
    inline: "
        package test:hostile;
        world hostile {
            include switchboard:policy/authenticator@0.1.0;
            include switchboard:policy/message-filter@0.1.0;
            include switchboard:policy/router@0.1.0;
        }
    ",
    path: "../../wit",
    world: "test:hostile/hostile",
    generate_all,
});

use exports::switchboard::policy::{auth, filter, routing};
use switchboard::policy::host;

thread_local! {
    static MODE: RefCell<String> = RefCell::new(String::from("allow"));
}

fn mode() -> String {
    MODE.with(|m| m.borrow().clone())
}

fn init(config: String) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
    let mode = value["mode"].as_str().unwrap_or("allow").to_string();
    if mode == "fail-init" {
        return Err("hostile plugin refuses to start (mode = fail-init)".into());
    }
    MODE.with(|m| *m.borrow_mut() = mode);
    Ok(())
}

/// The shared misbehaviours; returns only for modes that are not one of them.
fn misbehave() {
    match mode().as_str() {
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "hog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "trap" => panic!("hostile plugin traps (mode = trap)"),
        _ => {}
    }
}

struct Hostile;

impl filter::Guest for Hostile {
    fn init(config: String) -> Result<(), String> {
        init(config)
    }

    fn filter(message: filter::Message) -> filter::Verdict {
        misbehave();
        match mode().as_str() {
            "trap-on-boom" if message.data.contains("boom") => panic!("boom"),
            "huge" => filter::Verdict::Rewrite(format!("\"{}\"", "x".repeat(1 << 20))),
            "garbage" => filter::Verdict::Rewrite("{not json".into()),
            "show-metadata" => {
                let pairs: Vec<String> = message.sender_metadata.iter().map(|p| format!("{}={}", p.key, p.value)).collect();
                filter::Verdict::Deny(format!("metadata: {}", pairs.join(",")))
            }
            "chatty" => {
                let line = "x".repeat(100 * 1024);
                for _ in 0..1000 {
                    host::log(host::Level::Info, &line);
                }
                filter::Verdict::Allow
            }
            _ => filter::Verdict::Allow,
        }
    }
}

impl auth::Guest for Hostile {
    fn init(config: String) -> Result<(), String> {
        init(config)
    }

    fn authenticate(request: auth::ConnectRequest) -> Result<auth::Identity, auth::Rejection> {
        misbehave();
        let uid = match mode().as_str() {
            "huge" => "u".repeat(1 << 20),
            "garbage" => String::new(),
            _ => request.token,
        };
        Ok(auth::Identity { uid, metadata: Vec::new() })
    }
}

impl routing::Guest for Hostile {
    fn init(config: String) -> Result<(), String> {
        init(config)
    }

    fn route(_app: String, users: Vec<routing::User>, _nodes: Vec<routing::Node>) -> Result<Vec<u32>, String> {
        misbehave();
        Ok(match mode().as_str() {
            "huge" => vec![0; 1 << 20],
            "garbage" => vec![99_999; users.len()],
            _ => vec![0; users.len()],
        })
    }
}

export!(Hostile);
