//! Test support shared by the integration tests and the demo: network
//! namespaces, a packet builder, the namespace lab.
pub mod bench;
pub mod fixture;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod resp;
