//! Rebuild when the embedded migrations in `schema/` change (`sqlx::migrate!` reads them at
//! compile time).
fn main() {
    println!("cargo:rerun-if-changed=../schema");
}
