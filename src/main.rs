fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    formid_ledger::cli::main()
}

/// glibc gives threads that allocate at once arenas of their own (up to 8 per core)
/// and keeps what is freed in each: with the sender's blocking threads and the HTTP
/// workers, a 100,000-recipient campaign took the service's peak RSS from 69 MB to
/// 170 MB on SQLite (`scripts/bench.sh`, campaign scenario, with and without
/// `MALLOC_ARENA_MAX=2`), at no gain in speed. Two arenas, before any thread starts;
/// `MALLOC_ARENA_MAX` set by the operator wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called first thing in
        // main, while the process has one thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
