//! Ferrule's messaging core: an AMQP 1.0 router and broker in one process.
//!
//! Addresses are resolved by pattern ([`address`]) to one of four node types:
//! direct `anycast`/`multicast` nodes hand each message to consumers with credit and
//! report the consumer's outcome to the producer (nothing is buffered: no credit means
//! `released` at once); `queue` and `topic` nodes store messages durably ([`store`],
//! group-committed fsync) before answering `accepted`, and deliver them in order with
//! redelivery, TTL expiry and dead-lettering.
//!
//! Two front doors share the same nodes: the in-process API ([`Broker::submit`],
//! [`Broker::subscribe`]) used by the protocol adapters, and the AMQP 1.0 listener
//! ([`AmqpServer`]) used by applications, with SASL and per-tenant authorisation.

pub mod address;
mod broker;
mod coalesce;
pub mod config;
mod delivery;
mod direct;
mod guard;
pub mod message;
mod queue;
pub mod remote;
mod sasl;
mod server;
mod store;
mod topic;

pub use broker::{AddressHandler, AttachHook, Broker, BrokerError, SubscribeOptions};
pub use config::{
    AddressScheme, BackendConfig, BackendKind, MessagingConfig, SaslConfig, UserConfig,
};
pub use delivery::{Consumer, Delivery};
pub use message::{Message, Outcome, Submission};
pub use sasl::{Authenticator, Identity};
pub use server::{AmqpServer, ServerError};
pub use store::StoreError;

/// For the fuzz targets (`fuzz/`, see `fuzz/README.md`) and the hostile-input tests only:
/// the AMQP frame guard, which is otherwise private, the decoder it protects and a
/// hostile-input builder. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::guard::{scan, FrameChecker, FrameError, ScanError, MAX_DEPTH};
    pub use fe2o3_amqp;

    /// An AMQP list nested `depth` levels (list32 headers outermost first, an empty list0
    /// inside), built without recursion: the hostile input of the depth tests.
    pub fn nested_lists(depth: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(depth * 9 + 1);
        for level in 0..depth {
            let inner = (depth - level - 1) * 9 + 1;
            out.push(0xd0);
            out.extend_from_slice(&(inner as u32 + 4).to_be_bytes());
            out.extend_from_slice(&1u32.to_be_bytes());
        }
        out.push(0x45);
        out
    }

    /// An encoded open performative from container `container_id` (64 KiB frames).
    pub fn open_performative(container_id: &str) -> Vec<u8> {
        let open = fe2o3_amqp_types::performatives::Open {
            container_id: container_id.into(),
            hostname: None,
            max_frame_size: 65_536.into(),
            channel_max: 8.into(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        serde_amqp::to_vec(&open).expect("an open encodes")
    }

    /// An encoded transfer performative for link `handle` (delivery 0, unsettled).
    pub fn transfer_performative(handle: u32, more: bool) -> Vec<u8> {
        let transfer = fe2o3_amqp_types::performatives::Transfer {
            handle: handle.into(),
            delivery_id: Some(0),
            delivery_tag: Some(fe2o3_amqp_types::primitives::Binary::from(vec![0])),
            message_format: Some(0),
            settled: Some(false),
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        serde_amqp::to_vec(&transfer).expect("a transfer encodes")
    }
}
