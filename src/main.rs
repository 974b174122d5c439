fn main() -> std::process::ExitCode {
    formid_ledger::cli::main()
}
