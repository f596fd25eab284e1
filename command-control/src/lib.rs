//! Ferrule's command & control: commands from applications (`command/TENANT`, Hono's
//! format) to the adapter session that holds the device's command subscription, and the
//! device's responses back to `command_response/TENANT/REPLY-ID`.
//!
//! The [`CommandRouter`] takes over `command/` in the messaging core
//! ([`ferrule_messaging::AddressHandler`]). Adapters register a [`CommandSink`] per
//! subscription (MQTT subscribe, HTTP/CoAP `hono-ttd` poll); the command's outcome is the
//! sink's (accepted once the device has it, released if it is not connected or did not
//! acknowledge). Request ids ([`RequestId`]) carry the reply address and correlation id,
//! so any adapter instance can route a response without shared state, and a MAC under the
//! deployment's [`RequestKey`], so only the device a command went to (or its gateway) can
//! answer it. Commands for an
//! offline device with `x-ferrule-defer-ttl` wait in a durable per-device queue.
//!
//! In cluster mode a [`CommandCluster`] (the platform's, over Redis) records every
//! subscription as a lease; a command whose device has no session here goes to the
//! instance holding it (marked [`FORWARDED_ANNOTATION`], its reply address naming this
//! instance, so that the response comes back here), and deferred commands are kept where
//! every instance finds them.

mod cluster;
mod command;
pub mod presence;
mod request_id;
mod router;

pub use cluster::{CommandCluster, FORWARDED_ANNOTATION};
pub use command::{Command, CommandError, DEFER_TTL_PROPERTY};
pub use request_id::{RequestId, RequestIdError, RequestKey, KEY_FILE};
pub use router::{
    address_rules, messaging_config, BoxFuture, CommandRouter, CommandSink, DeviceCheck, Notify,
    RespondError, Response, Subscription, Target, DEFERRED_PREFIX,
};
