//! Consistency groups: several jobs started at one point in time with one outcome
//! (`backup_start_group`). No job of a group reaches `Completed` before every job has
//! finished copying; when one fails or is cancelled, the others are cancelled (and so
//! every bitmap goes back as for a failure).
//!
//! The outcome is decided once, atomically, when the last member arrives: if every
//! member finished copying and none failed or was cancelled by then, the group
//! **commits**: every member will end `Completed`, and a later `cancel` of a member (or
//! `cowbackup_job_free` of one, which cancels first) changes nothing. A cancel that
//! lands before the commit fails the whole group. So members never end split, one
//! `Completed` and another `Cancelled` (QEMU's grouped transactions abort every job).

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::JobShared;

/// The members of a group and where they are.
pub(crate) struct Group {
    /// How many jobs the group has.
    n: usize,
    /// The jobs of the group, in the order given, added once all are set up. Weak: a job
    /// does not keep the others alive. Protected by this mutex.
    members: Mutex<Vec<Weak<JobShared>>>,
    /// Protected by this mutex.
    state: Mutex<GroupState>,
    /// Signalled on every arrival.
    arrived_cv: Condvar,
}

#[derive(Default)]
struct GroupState {
    /// Jobs that have finished copying (or failed).
    arrived: usize,
    /// A job failed or was cancelled: the group fails.
    failed: bool,
    /// Every job arrived ok and none was cancelled: every job completes (see the module doc).
    committed: bool,
}

impl Group {
    /// A group of `n` jobs; each is added with [`Group::add`] before any starts.
    pub fn new(n: usize) -> Arc<Group> {
        Arc::new(Group {
            n,
            members: Mutex::new(Vec::with_capacity(n)),
            state: Mutex::new(GroupState::default()),
            arrived_cv: Condvar::new(),
        })
    }

    pub fn add(&self, job: &Arc<JobShared>) {
        self.members.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(job));
    }

    /// Called by each job thread when its copy is over (`ok`: copied and flushed, no
    /// error, not cancelled). A job that is ok waits for the others; when the group
    /// fails, every job that has not ended is cancelled. Returns when this job may end.
    pub fn arrive(&self, me: &JobShared, ok: bool) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.arrived += 1;
        if !ok {
            st.failed = true;
        }
        loop {
            // A cancel of this job while it waits fails the group.
            if !st.failed && !st.committed && me.cancel_requested() {
                st.failed = true;
            }
            if st.failed {
                drop(st);
                self.arrived_cv.notify_all();
                self.cancel_all();
                return;
            }
            if st.arrived == self.n {
                if !st.committed && !self.commit() {
                    st.failed = true;
                    continue;
                }
                st.committed = true;
                drop(st);
                self.arrived_cv.notify_all();
                return;
            }
            st = self.arrived_cv.wait_timeout(st, Duration::from_millis(20)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Decide that every member completes, atomically with respect to `cancel` and fatal
    /// errors: with every member's control lock held (in member order; the group's state
    /// lock is taken before any control lock, everywhere), check that none was cancelled
    /// or failed, then mark them all committed. False when one was (the group fails).
    fn commit(&self) -> bool {
        let members: Vec<_> =
            self.members.lock().unwrap_or_else(|e| e.into_inner()).iter().map(Weak::upgrade).collect();
        let Some(members) = members.into_iter().collect::<Option<Vec<_>>>() else {
            return false; // a member is gone: it cannot complete
        };
        if members.len() != self.n {
            return false;
        }
        let mut controls: Vec<_> = members.iter().map(|m| m.lock()).collect();
        if controls.iter().any(|c| c.cancel || c.fatal.is_some()) {
            return false;
        }
        for c in &mut controls {
            c.group_committed = true;
        }
        true
    }

    fn cancel_all(&self) {
        let members: Vec<_> =
            self.members.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
        for m in members {
            m.cancel();
        }
    }
}
