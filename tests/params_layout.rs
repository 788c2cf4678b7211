//! kernels/params.h is the one description of kernel parameters: the Rust
//! structs are generated from it by build.rs, and this test compares the
//! Rust layout with the C compiler's (size and every field offset).
use rwkv_tune::params::{Wkv7Params, WKV7_V1_CHUNK};

#[test]
fn wkv7_params_layout_matches_c() {
    let (size, offs) = Wkv7Params::c_layout();
    assert_eq!(
        size,
        std::mem::size_of::<Wkv7Params>(),
        "sizeof(Wkv7Params) differs between C and Rust"
    );
    assert_eq!(offs.len(), Wkv7Params::FIELDS.len(), "field count differs");
    for ((c, r), name) in offs.iter().zip(Wkv7Params::OFFSETS).zip(Wkv7Params::FIELDS) {
        assert_eq!(
            c, r,
            "offset of `{name}` differs between C ({c}) and Rust ({r})"
        );
    }
}

#[test]
fn chunk_constant_matches_header() {
    let header = include_str!("../kernels/params.h");
    let line = header
        .lines()
        .find(|l| l.starts_with("#define WKV7_V1_CHUNK"))
        .expect("WKV7_V1_CHUNK in params.h");
    let v: usize = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(v, WKV7_V1_CHUNK);
}
