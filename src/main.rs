//! `koprogo`: the KoproGo appliance's one binary. All the work is in the library;
//! this only hands the command line to `cli`.

fn main() -> std::process::ExitCode {
    koprogo::cli::main()
}
