//! Messages with fds attached (`SCM_RIGHTS`) over Unix sockets: the one primitive both fd
//! stores speak, systemd's notify datagrams and the holder's seqpacket connection.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

/// Sends `message` with `fds` attached, to `to` (a datagram socket) or the peer.
pub(crate) fn send(
    socket: BorrowedFd<'_>,
    to: Option<&UnixAddr>,
    message: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg(
        socket.as_raw_fd(),
        &[IoSlice::new(message)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        to,
    )?;
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", message.len()),
        ));
    }
    Ok(())
}

/// Receives one message into `buf` and the fds attached to it. Returns the message's length
/// (0 at the end of a connection).
pub(crate) fn recv(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let len = msg.bytes;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel installed these fds in this process for this message;
                // nothing else knows their numbers, so each gets exactly one owner here.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message longer than the buffer",
        ));
    }
    Ok((len, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;

    #[test]
    fn an_fd_travels_with_its_message() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let file = tempfile::tempfile().expect("temp file");
        std::io::Write::write_all(&mut &file, b"held").expect("write");
        send(a.as_fd(), None, b"PUT x", &[file.as_fd()]).expect("send");
        let mut buf = [0u8; 64];
        let (len, fds) = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..len], b"PUT x");
        assert_eq!(fds.len(), 1);
        // The same open file: its offset moved with our write.
        let received = std::fs::File::from(fds.into_iter().next().expect("fd"));
        let mut data = String::new();
        std::io::Seek::rewind(&mut &received).expect("rewind");
        std::io::Read::read_to_string(&mut &received, &mut data).expect("read");
        assert_eq!(data, "held");

        send(a.as_fd(), None, b"LIST", &[]).expect("send");
        let (len, fds) = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((&buf[..len], fds.len()), (&b"LIST"[..], 0));
        drop(a);
        assert_eq!(recv(b.as_fd(), &mut buf).expect("eof").0, 0);
    }
}
