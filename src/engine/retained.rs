//! Memory that idle instance slots keep resident, counted in the memory
//! budget.
//!
//! When an instance ends, its slot in wasmtime's pooling allocator keeps
//! part of each linear memory, table and fiber stack resident (up to
//! `memory-keep-resident`), so the next instance there takes no page
//! faults for it. Every slot an instance ever used keeps that memory, not
//! only the warm slots wasmtime prefers, so after a burst of N instances a
//! process holds up to N times `memory-keep-resident` that serves nobody
//! (48 interpreter instances copying back 16 MiB each is 768 MiB). The
//! headroom the budget leaves for the process allows for the warm slots
//! only; what the slots of one engine keep past that is charged to the
//! budget here, as wasmtime reports it, so it holds back new instances and
//! buffered bodies as memory the guests hold would.
//!
//! An instance that starts in such a slot takes that memory back: a new
//! instance's room is checked with the slot it will take as a credit, and
//! the charge is brought up to date as its memory is created (the slot has
//! left the idle ones by then), on every instance creation, and every
//! [`SYNC_EVERY`] otherwise.

use crate::engine::budget::MemoryBudget;
use std::sync::{Arc, Mutex};
use wasmtime::Engine;

/// How often the charge follows what the slots keep when no instance is
/// created.
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The charge for one engine's idle slots.
pub struct Retained {
    budget: Arc<MemoryBudget>,
    engine: Engine,
    /// What the process's headroom already holds for these slots.
    allowance: u64,
    /// Bytes charged to the budget now.
    charged: Mutex<u64>,
}

impl Retained {
    pub fn new(budget: Arc<MemoryBudget>, engine: Engine, allowance: u64) -> Retained {
        Retained {
            budget,
            engine,
            allowance,
            charged: Mutex::new(0),
        }
    }

    /// What the engine's idle slots keep resident now: memories, tables and
    /// fiber stacks.
    fn resident(&self) -> u64 {
        match self.engine.pooling_allocator_metrics() {
            Some(m) => {
                m.unused_memory_bytes_resident() as u64
                    + m.unused_table_bytes_resident() as u64
                    + m.unused_stack_bytes_resident().unwrap_or(0) as u64
            }
            None => 0,
        }
    }

    /// Brings the charge up to what the idle slots keep past the allowance.
    pub fn sync(&self) {
        let now = self.resident().saturating_sub(self.allowance);
        let mut charged = self.charged.lock().unwrap_or_else(|e| e.into_inner());
        self.budget.retain(*charged, now);
        *charged = now;
    }

    /// What a new instance takes back from the charge: what one idle slot
    /// keeps, on average (0 when the charge is 0 or no slot is idle).
    pub fn credit(&self) -> u64 {
        let charged = *self.charged.lock().unwrap_or_else(|e| e.into_inner());
        if charged == 0 {
            return 0;
        }
        let Some(m) = self.engine.pooling_allocator_metrics() else {
            return 0;
        };
        match m.unused_warm_memories() {
            0 => 0,
            warm => charged.min(m.unused_memory_bytes_resident() as u64 / warm as u64),
        }
    }

    /// Bytes charged to the budget now.
    pub fn charged(&self) -> u64 {
        *self.charged.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Retained {
    fn drop(&mut self) {
        let charged = self.charged.get_mut().unwrap_or_else(|e| e.into_inner());
        self.budget.retain(*charged, 0);
    }
}

impl std::fmt::Debug for Retained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("allowance", &self.allowance)
            .field("charged", &self.charged())
            .finish()
    }
}
