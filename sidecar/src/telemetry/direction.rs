//! [`Direction`]: which of the two proxying listeners a request or
//! connection came through. A leaf: metrics, spans, access log lines and
//! the request path all label by it.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}
