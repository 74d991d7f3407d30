fn main() {
    std::process::exit(chunkvol::cli::main());
}
