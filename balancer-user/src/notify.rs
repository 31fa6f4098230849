//! The `[vrrp] notify` command: run as `<command> <state> <vrid>` after
//! each state change of the election, like keepalived's `notify` script.
//!
//! The election only queues the new state ([`Notifier::notify`] never
//! blocks); a task on the agent's main runtime runs the commands one after
//! the other, in order, each killed after [`NOTIFY_TIMEOUT`]. A failing or
//! hanging command is logged and changes nothing else.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{process::Command, runtime::Handle, sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use crate::vrrp::State;

/// A notify command still running after this long is killed.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The state argument: `master`, `backup`, `fault`, or `stopped` for
/// Initialize (the election stopped).
pub fn state_argument(state: State) -> &'static str {
    match state {
        State::Master => "master",
        State::Backup => "backup",
        State::Fault => "fault",
        State::Initialize => "stopped",
    }
}

/// Queue of notifications and the task that runs them.
#[derive(Debug)]
pub struct Notifier {
    queue: mpsc::UnboundedSender<State>,
    task: JoinHandle<()>,
}

impl Notifier {
    /// Starts the task on `runtime` running `command` for virtual router
    /// `vrid`.
    pub fn spawn(runtime: &Handle, command: PathBuf, vrid: u8) -> Notifier {
        let (queue, mut states) = mpsc::unbounded_channel::<State>();
        let task = runtime.spawn(async move {
            while let Some(state) = states.recv().await {
                run(&command, state, vrid).await;
            }
        });
        Notifier { queue, task }
    }

    /// Queues `state`; returns at once.
    pub fn notify(&self, state: State) {
        let _ = self.queue.send(state);
    }

    /// Lets the queued commands finish for at most `wait`, then kills
    /// what still runs.
    pub async fn close(self, wait: Duration) {
        let Notifier { queue, mut task } = self;
        drop(queue);
        if tokio::time::timeout(wait, &mut task).await.is_err() {
            warn!("notify commands still running at shutdown, killing them");
            task.abort();
        }
    }
}

async fn run(command: &PathBuf, state: State, vrid: u8) {
    let state = state_argument(state);
    let mut cmd = Command::new(command);
    for var in crate::service_manager::CHILD_ENV_REMOVE {
        cmd.env_remove(var);
    }
    let mut child = match cmd
        .arg(state)
        .arg(vrid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            warn!(command = %command.display(), state, vrid, %error, "cannot run the notify command");
            return;
        }
    };
    match tokio::time::timeout(NOTIFY_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            debug!(command = %command.display(), state, vrid, "notify command done");
        }
        Ok(Ok(status)) => {
            warn!(command = %command.display(), state, vrid, %status, "notify command failed");
        }
        Ok(Err(error)) => {
            warn!(command = %command.display(), state, vrid, %error, "cannot wait for the notify command");
        }
        Err(_) => {
            warn!(
                command = %command.display(),
                state,
                vrid,
                timeout = ?NOTIFY_TIMEOUT,
                "notify command timed out, killing it"
            );
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_arguments() {
        assert_eq!(state_argument(State::Master), "master");
        assert_eq!(state_argument(State::Backup), "backup");
        assert_eq!(state_argument(State::Fault), "fault");
        assert_eq!(state_argument(State::Initialize), "stopped");
    }

    #[tokio::test]
    async fn commands_run_in_order_with_state_and_vrid() {
        let dir = std::env::temp_dir().join(format!("balancer-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let script = dir.join("notify.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$1 $2\" >> {}\n", log.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

        let notifier = Notifier::spawn(&Handle::current(), script, 42);
        for state in [
            State::Backup,
            State::Master,
            State::Fault,
            State::Initialize,
        ] {
            notifier.notify(state);
        }
        notifier.close(Duration::from_secs(10)).await;
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, "backup 42\nmaster 42\nfault 42\nstopped 42\n");
    }

    #[tokio::test]
    async fn a_missing_command_is_only_logged() {
        let notifier = Notifier::spawn(
            &Handle::current(),
            PathBuf::from("/nonexistent/balancer-notify"),
            1,
        );
        notifier.notify(State::Master);
        notifier.close(Duration::from_secs(5)).await;
    }
}
