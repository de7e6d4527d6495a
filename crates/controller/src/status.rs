//! The status a plane CR should have, computed from what the controller observed. Pure: the
//! reconciler writes the result only when it differs from the current status.

use buildplane_api::{
    AgentConnectionStatus, BuildPlaneStatus,
    names::{condition, reason},
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::ca::CaCheck;

/// What the gateway says about the agents of one CR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentView {
    /// The number of connected agents authorised for the CR, and when one was last heard from.
    Known {
        connected_agents: u32,
        last_seen: Option<Timestamp>,
    },
    /// The process started and has not read the gateway's first snapshot yet: the status keeps
    /// what it shows, so a restarted controller does not churn it.
    Pending,
    /// The gateway is unreachable (or not configured).
    Unknown,
}

/// Everything the status is computed from.
#[derive(Debug, Clone)]
pub struct Observed {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The result of resolving `clientCA` (or of validating the spec).
    pub ca: CaCheck,
    /// Agent connections.
    pub agents: AgentView,
}

/// The message OpenChoreo writes for a number of agents.
pub fn connection_message(connected_agents: u32) -> String {
    match connected_agents {
        0 => "No agents connected".to_owned(),
        1 => "1 agent connected".to_owned(),
        n => format!("{n} agents connected (HA mode)"),
    }
}

/// Computes the desired status; fields that did not change keep their timestamps.
pub fn desired_status(
    current: Option<&BuildPlaneStatus>,
    observed: &Observed,
    now: Timestamp,
) -> BuildPlaneStatus {
    let current = current.cloned().unwrap_or_default();
    let mut conditions = current.conditions.clone();
    let generation = observed.generation;

    let (ca_status, ca_reason) = if observed.ca.usable {
        ("True", observed.ca.reason)
    } else {
        ("False", observed.ca.reason)
    };
    set_condition(
        &mut conditions,
        condition::CLIENT_CA_RESOLVED,
        ca_status,
        ca_reason,
        &observed.ca.message,
        generation,
        now,
    );

    let previous_agent = conditions
        .iter()
        .find(|c| c.type_ == condition::AGENT_CONNECTED)
        .cloned();
    let (agent_connection, connected) = match observed.agents {
        AgentView::Pending => {
            match previous_agent {
                Some(previous) => {
                    // Keep the condition as it is; only the generation it describes moves.
                    set_condition(
                        &mut conditions,
                        condition::AGENT_CONNECTED,
                        &previous.status,
                        &previous.reason,
                        &previous.message,
                        generation,
                        now,
                    );
                }
                None => set_condition(
                    &mut conditions,
                    condition::AGENT_CONNECTED,
                    "Unknown",
                    reason::GATEWAY_UNREACHABLE,
                    "waiting for the cluster gateway's first report",
                    generation,
                    now,
                ),
            }
            let connected = current
                .agent_connection
                .as_ref()
                .is_some_and(|c| c.connected);
            (current.agent_connection.clone(), connected)
        }
        AgentView::Unknown => {
            set_condition(
                &mut conditions,
                condition::AGENT_CONNECTED,
                "Unknown",
                reason::GATEWAY_UNREACHABLE,
                "the cluster gateway has not reported this plane's connections",
                generation,
                now,
            );
            (current.agent_connection.clone(), false)
        }
        AgentView::Known {
            connected_agents,
            last_seen,
        } => {
            let connected = connected_agents > 0;
            let previous = current.agent_connection.clone().unwrap_or_default();
            let was_connected = current.agent_connection.as_ref().map(|c| c.connected);
            let message = connection_message(connected_agents);
            set_condition(
                &mut conditions,
                condition::AGENT_CONNECTED,
                if connected { "True" } else { "False" },
                if connected {
                    reason::AGENTS_CONNECTED
                } else {
                    reason::NO_AGENTS_CONNECTED
                },
                &message,
                generation,
                now,
            );
            let last_connected_time = if connected && was_connected != Some(true) {
                Some(Time(now))
            } else {
                previous.last_connected_time
            };
            // "Heartbeat" is the last connection event the gateway reported for this CR, not
            // every ping: per-ping updates would write every CR's status every 30 s.
            let last_heartbeat_time = last_seen
                .map(Time)
                .or(previous.last_heartbeat_time)
                .or_else(|| connected.then(|| last_connected_time.clone()).flatten());
            let status = AgentConnectionStatus {
                connected,
                connected_agents: i32::try_from(connected_agents).unwrap_or(i32::MAX),
                last_connected_time,
                last_disconnected_time: if !connected && was_connected == Some(true) {
                    Some(Time(now))
                } else {
                    previous.last_disconnected_time
                },
                last_heartbeat_time,
                message: Some(message),
            };
            (Some(status), connected)
        }
    };

    let previous_ready = conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .filter(|c| {
            [
                reason::AGENTS_CONNECTED,
                reason::NO_AGENTS_CONNECTED,
                reason::GATEWAY_UNREACHABLE,
            ]
            .contains(&c.reason.as_str())
        })
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    let (ready, ready_reason, ready_message) = if !observed.ca.usable {
        (
            "False",
            observed.ca.reason,
            format!("clientCA: {}", observed.ca.message),
        )
    } else if let (AgentView::Pending, Some((status, reason, message))) =
        (observed.agents, &previous_ready)
    {
        // The agent side of Ready is not known yet: keep what it said.
        (status.as_str(), reason.as_str(), message.clone())
    } else if !connected {
        let why = match observed.agents {
            AgentView::Known { .. } => reason::NO_AGENTS_CONNECTED,
            AgentView::Pending | AgentView::Unknown => reason::GATEWAY_UNREACHABLE,
        };
        (
            "False",
            why,
            "no agent is connected for this plane".to_owned(),
        )
    } else {
        (
            "True",
            reason::AGENTS_CONNECTED,
            "clientCA resolved and an agent is connected".to_owned(),
        )
    };
    set_condition(
        &mut conditions,
        condition::READY,
        ready,
        ready_reason,
        &ready_message,
        generation,
        now,
    );

    BuildPlaneStatus {
        observed_generation: generation,
        conditions,
        agent_connection,
    }
}

/// Sets one condition, keeping `lastTransitionTime` unless the status changed.
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let existing = conditions.iter_mut().find(|c| c.type_ == type_);
    match existing {
        Some(cond) => {
            if cond.status != status {
                cond.last_transition_time = Time(now);
            }
            cond.status = status.to_owned();
            cond.reason = reason.to_owned();
            cond.message = message.to_owned();
            cond.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved() -> CaCheck {
        CaCheck {
            usable: true,
            reason: reason::RESOLVED,
            message: "1 certificate(s)".into(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid time")
    }

    fn cond<'a>(status: &'a BuildPlaneStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    /// A resolved CA and one agent make the CR Ready, with OpenChoreo's message.
    #[test]
    fn resolved_ca_and_one_agent_is_ready() {
        let observed = Observed {
            generation: Some(3),
            ca: resolved(),
            agents: AgentView::Known {
                connected_agents: 1,
                last_seen: Some(at(0)),
            },
        };
        let status = desired_status(None, &observed, at(1));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(cond(&status, condition::READY).status, "True");
        assert_eq!(
            cond(&status, condition::AGENT_CONNECTED).reason,
            reason::AGENTS_CONNECTED
        );
        let connection = status.agent_connection.expect("connection status");
        assert!(connection.connected);
        assert_eq!(connection.message.as_deref(), Some("1 agent connected"));
        assert_eq!(connection.last_connected_time, Some(Time(at(1))));
    }

    /// Recomputing with the same observations yields an identical status (no write).
    #[test]
    fn unchanged_observations_give_an_identical_status() {
        let observed = Observed {
            generation: Some(1),
            ca: resolved(),
            agents: AgentView::Known {
                connected_agents: 2,
                last_seen: Some(at(0)),
            },
        };
        let first = desired_status(None, &observed, at(1));
        let second = desired_status(Some(&first), &observed, at(50));
        assert_eq!(
            first, second,
            "a later reconcile must not rewrite timestamps"
        );
        assert_eq!(
            second.agent_connection.and_then(|c| c.message).as_deref(),
            Some("2 agents connected (HA mode)")
        );
    }

    /// Losing the last agent records the disconnect time and flips Ready.
    #[test]
    fn last_agent_leaving_records_disconnect() {
        let connected = Observed {
            generation: Some(1),
            ca: resolved(),
            agents: AgentView::Known {
                connected_agents: 1,
                last_seen: Some(at(0)),
            },
        };
        let first = desired_status(None, &connected, at(1));
        let gone = Observed {
            agents: AgentView::Known {
                connected_agents: 0,
                last_seen: None,
            },
            ..connected
        };
        let second = desired_status(Some(&first), &gone, at(10));
        let connection = second.agent_connection.as_ref().expect("connection status");
        assert!(!connection.connected);
        assert_eq!(connection.last_disconnected_time, Some(Time(at(10))));
        assert_eq!(connection.last_connected_time, Some(Time(at(1))));
        assert_eq!(connection.last_heartbeat_time, Some(Time(at(0))));
        assert_eq!(cond(&second, condition::READY).status, "False");
        assert_eq!(
            cond(&second, condition::READY).last_transition_time,
            Time(at(10))
        );
    }

    /// A failing CA makes Ready False with the CA's reason, even with agents connected.
    #[test]
    fn failing_ca_is_not_ready() {
        for failing in [
            reason::SECRET_NOT_FOUND,
            reason::KEY_NOT_FOUND,
            reason::INVALID_PEM,
            reason::CA_EXPIRED,
            reason::INVALID_SPEC,
        ] {
            let observed = Observed {
                generation: Some(1),
                ca: CaCheck {
                    usable: false,
                    reason: failing,
                    message: "why".into(),
                },
                agents: AgentView::Known {
                    connected_agents: 1,
                    last_seen: None,
                },
            };
            let status = desired_status(None, &observed, at(0));
            assert_eq!(cond(&status, condition::CLIENT_CA_RESOLVED).status, "False");
            assert_eq!(cond(&status, condition::CLIENT_CA_RESOLVED).reason, failing);
            assert_eq!(cond(&status, condition::READY).reason, failing);
        }
    }

    /// An unknown gateway view keeps the last known connection status.
    #[test]
    fn unknown_gateway_keeps_last_connection_status() {
        let connected = Observed {
            generation: Some(1),
            ca: resolved(),
            agents: AgentView::Known {
                connected_agents: 1,
                last_seen: Some(at(0)),
            },
        };
        let first = desired_status(None, &connected, at(1));
        let unknown = Observed {
            agents: AgentView::Unknown,
            ..connected
        };
        let second = desired_status(Some(&first), &unknown, at(5));
        assert_eq!(second.agent_connection, first.agent_connection);
        assert_eq!(cond(&second, condition::AGENT_CONNECTED).status, "Unknown");
        assert_eq!(
            cond(&second, condition::AGENT_CONNECTED).reason,
            reason::GATEWAY_UNREACHABLE
        );
    }
}
