//! Host bindings generated from `wit/`, once, for a host-side world that includes every
//! plugin world. A plugin implements one (or more) of them; its exported interface is
//! looked up per component with the generated `GuestIndices`, so one set of Rust types
//! serves every world.

// The generated code calls `TypedFunc::new_unchecked` on functions whose types bindgen checked
// when the component was linked; that unsafe is wasmtime's, not ours.
#![allow(unsafe_code)]
#![allow(missing_docs, missing_debug_implementations, unreachable_pub, elided_lifetimes_in_paths, clippy::all)]

wasmtime::component::bindgen!({
    inline: "
        package switchboard:host;
        world plugins {
            include switchboard:policy/authenticator@0.1.0;
            include switchboard:policy/message-filter@0.1.0;
            include switchboard:policy/batch-message-filter@0.1.0;
            include switchboard:policy/router@0.1.0;
        }
    ",
    path: "wit",
    world: "switchboard:host/plugins",
    ownership: Borrowing { duplicate_if_necessary: true },
});

pub use self::exports::switchboard::policy::{auth, batch_filter, filter, routing};
pub use self::switchboard::policy::{host, types};
