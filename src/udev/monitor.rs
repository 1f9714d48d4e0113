//! The udev monitor thread.
//!
//! libudev's monitor socket is not `Send`, so it lives on a dedicated std thread that polls it
//! (half-second ticks, so it notices a closed channel promptly) and sends owned
//! [`DeviceEvent`]s into a tokio channel. The thread ends when the receiver is dropped (agent
//! shutdown). Errors are logged, never panicked on: a monitor that cannot start leaves the
//! agent working without events.

use std::os::fd::AsFd;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::{Action, DeviceEvent, Error, TAG, scan::snapshot};

const POLL_TICK_MS: u16 = 500;

/// Start listening for block-device events of devices tagged [`TAG`]. The socket is set up
/// before this returns (so the caller can enumerate afterwards and miss nothing in between);
/// the events then arrive on `tx`.
pub fn spawn_monitor(
    tx: UnboundedSender<DeviceEvent>,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
    let handle = std::thread::Builder::new()
        .name("volcrypt-udev".into())
        .spawn(move || {
            let socket = match listen() {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            run(&socket, &tx);
            tracing::debug!("udev monitor thread stopped");
        })
        .map_err(|e| Error::udev("spawn monitor thread", e))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::udev(
            "start monitor",
            std::io::Error::other("monitor thread ended before it was listening"),
        )),
    }
}

fn listen() -> Result<udev::MonitorSocket, Error> {
    udev::MonitorBuilder::new()
        .and_then(|b| b.match_subsystem("block"))
        .and_then(|b| b.match_tag(TAG))
        .and_then(|b| b.listen())
        .map_err(|e| Error::udev("listen for block events", e))
}

fn run(socket: &udev::MonitorSocket, tx: &UnboundedSender<DeviceEvent>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        if tx.is_closed() {
            return;
        }
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(POLL_TICK_MS)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "udev monitor: poll failed; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        for event in socket.iter() {
            let action = event
                .action()
                .map(|a| Action::parse(&a.to_string_lossy()))
                .unwrap_or(Action::Other);
            let device = snapshot(&event.device());
            tracing::debug!(
                ?action,
                devnode = device
                    .devnode
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .as_deref(),
                devno = device.devno.map(|d| d.to_string()).as_deref(),
                "udev event"
            );
            if tx.send(DeviceEvent { action, device }).is_err() {
                return;
            }
        }
    }
}
