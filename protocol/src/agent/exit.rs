//! Exit codes of the agent and of the wrapper. Over SSH the pbs sees one number, the
//! wrapper's when it refused or could not start the agent, else the agent's: the two
//! ranges never overlap, so the number alone says which program ended the run.

/// How `haul-agent` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentExit {
    /// Done: the snapshot was committed, or the restore is complete.
    Ok,
    /// Nothing was committed or restored; the `error` event says why.
    Failed,
    /// The command line, the run parameters or a backup path were wrong (or the
    /// wrapper was required and absent): a person must change something first.
    Usage,
    /// Done, with problems reported as `warning` events (some files could not be read
    /// completely, or some entries not restored).
    Warnings,
}

impl AgentExit {
    pub const fn code(self) -> i32 {
        match self {
            AgentExit::Ok => 0,
            AgentExit::Failed => 1,
            AgentExit::Usage => 2,
            AgentExit::Warnings => 3,
        }
    }

    /// `None` for any other code: a signal's, or a program that is not the agent.
    pub const fn from_code(code: i32) -> Option<AgentExit> {
        match code {
            0 => Some(AgentExit::Ok),
            1 => Some(AgentExit::Failed),
            2 => Some(AgentExit::Usage),
            3 => Some(AgentExit::Warnings),
            _ => None,
        }
    }

    /// Whether the run did its work (with or without warnings).
    pub const fn succeeded(self) -> bool {
        matches!(self, AgentExit::Ok | AgentExit::Warnings)
    }
}

/// How `haul-wrapper` ended when it did not become the agent (it execs the agent, so
/// otherwise the exit code is the agent's). It prints one line on stderr saying why.
/// None of these is worth retrying as is: the host's policy or installation decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrapperExit {
    /// Its policy file is missing or invalid; nothing was run.
    PolicyInvalid,
    /// The command is not one its policy admits.
    Refused,
    /// The command was admitted, but the agent binary could not be executed.
    AgentNotStarted,
}

impl WrapperExit {
    pub const fn code(self) -> i32 {
        match self {
            WrapperExit::PolicyInvalid => 125,
            WrapperExit::Refused => 126,
            WrapperExit::AgentNotStarted => 127,
        }
    }

    /// `None` for any other code (the agent's own, among others).
    pub const fn from_code(code: i32) -> Option<WrapperExit> {
        match code {
            125 => Some(WrapperExit::PolicyInvalid),
            126 => Some(WrapperExit::Refused),
            127 => Some(WrapperExit::AgentNotStarted),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_never_overlap() {
        let agent = [
            AgentExit::Ok,
            AgentExit::Failed,
            AgentExit::Usage,
            AgentExit::Warnings,
        ];
        let wrapper = [
            WrapperExit::PolicyInvalid,
            WrapperExit::Refused,
            WrapperExit::AgentNotStarted,
        ];
        for e in agent {
            assert_eq!(AgentExit::from_code(e.code()), Some(e));
            assert_eq!(WrapperExit::from_code(e.code()), None);
        }
        for e in wrapper {
            assert_eq!(WrapperExit::from_code(e.code()), Some(e));
            assert_eq!(AgentExit::from_code(e.code()), None);
        }
        assert_eq!(
            agent.iter().filter(|e| e.succeeded()).count(),
            2,
            "ok and warnings"
        );
        assert_eq!(AgentExit::from_code(-1), None);
    }
}
