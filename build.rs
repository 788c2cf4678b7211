//! Build script: three jobs, all driven by the files in kernels/; jobs 2
//! and 3 run only for the crate features that need them (`emu`, `cuda`).
//!
//! 1. Parse `kernels/params.h` and generate the matching `#[repr(C)]` Rust
//!    structs (`$OUT_DIR/params.rs`) plus a C++ table of `offsetof` values
//!    (`$OUT_DIR/params_layout.cpp`) that a test compares with Rust's layout.
//! 2. Compile every `kernels/*.cu` with the host C++ compiler against the
//!    emulation header (`-DCUDA_EMU`), so the kernels run on the CPU.
//! 3. Feature `cuda`, if nvcc is found (env `NVCC`, `$CUDA_HOME/bin/nvcc`, `./.venv-cuda`
//!    from `.ci/setup-nvcc`, or `PATH`), compile every `kernels/*.cu` (only
//!    `wkv7_*.cu` without feature `model`) into a fatbin (sm_80 + sm_90
//!    machine code and compute_90 PTX) embedded in the crate. Fatbins are
//!    cached in `target/rwkv-tune-fatbins/`, keyed by nvcc, flags and the
//!    contents of kernels/, so other feature sets and profiles reuse them.
//!    Without nvcc the crate still builds; the CUDA backend then reports
//!    that the kernels were not built and how to build them.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "RWKV_TUNE_NO_NVCC",
        "RWKV_CUDA_ARCHS",
        "RWKV_TUNE_NO_FATBIN_CACHE",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(kernels_built)");
    println!("cargo::rustc-check-cfg=cfg(emu_counting)");
    let want_emu = env::var_os("CARGO_FEATURE_EMU").is_some();
    let want_cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();

    // ---- 1. params.h -> Rust + layout table ---------------------------------
    let header = fs::read_to_string(kdir.join("params.h")).expect("read kernels/params.h");
    let structs = parse_params(&header);
    fs::write(out.join("params.rs"), gen_rust(&structs)).unwrap();
    fs::write(
        out.join("params_layout.cpp"),
        gen_layout_cpp(&structs, &kdir),
    )
    .unwrap();

    let mut cu_files: Vec<PathBuf> = fs::read_dir(&kdir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu_files.sort();

    // ---- 2. emulated kernels (host C++) -------------------------------------
    if want_emu {
        build_emu(&kdir, &out, &cu_files);
    }

    // ---- 3. nvcc -> fatbins --------------------------------------------------
    if want_cuda {
        // The lean build (no `model`) needs only the WKV-7 kernels.
        let fat_files: Vec<PathBuf> = if env::var_os("CARGO_FEATURE_MODEL").is_some() {
            cu_files.clone()
        } else {
            cu_files
                .iter()
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("wkv7_"))
                })
                .cloned()
                .collect()
        };
        build_fatbins(&manifest, &kdir, &out, &fat_files);
    }
}

/// Job 2: every kernel file (and the layout table) compiled for the CPU.
fn build_emu(kdir: &Path, out: &Path, cu_files: &[PathBuf]) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .define("CUDA_EMU", None)
        .include(kdir)
        // kernel code reinterprets bf16 pairs and 16-byte pieces as words, as CUDA code does
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-pthread")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-variable")
        .file(out.join("params_layout.cpp"));
    for cu in cu_files {
        // g++ does not know the .cu extension: wrap each file in a .cpp.
        let stem = cu.file_stem().unwrap().to_string_lossy().to_string();
        let wrapper = out.join(format!("emu_{stem}.cpp"));
        fs::write(&wrapper, format!("#include \"{}\"\n", cu.display())).unwrap();
        build.file(wrapper);
    }
    build.compile("rwkv_tune_emu");
    println!("cargo:rustc-link-lib=pthread");
    build_emu_count(kdir, out);
}

/// Job 2b: the emulator's counting build (docs/emulation.md, "Memory
/// counters"): `kernels/emu/count_wkv7.cpp` compiled with
/// `-fsanitize=thread` (the emulation header defines the hooks; no TSan
/// runtime is linked), merged with `ld -r` (section groups dissolved) and
/// every symbol but the `emu_cnt_*` entries made local, so that its
/// instrumented copies of the inline emulator and kernel functions stay
/// private. x86-64 Linux with GNU ld and objcopy only; when any step fails
/// it is skipped with a warning and `rwkv_tune::emu` reports counting as
/// unavailable (cfg `emu_counting` unset).
fn build_emu_count(kdir: &Path, out: &Path) {
    let linux_x86 = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64");
    if !linux_x86 {
        return;
    }
    let objs = cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(1)
        .define("CUDA_EMU", None)
        .define("EMU_COUNT_MEM", None)
        .include(kdir)
        .flag_if_supported("-fno-strict-aliasing")
        .flag("-fsanitize=thread")
        .flag("-fno-gnu-unique")
        .flag_if_supported("-w")
        .cargo_warnings(false)
        .file(kdir.join("emu/count_wkv7.cpp"))
        .try_compile_intermediates();
    let merged = out.join("emu_count_merged.o");
    let local = out.join("emu_count.o");
    let lib = out.join("librwkv_tune_emu_count.a");
    let _ = fs::remove_file(&lib);
    let ok = objs.is_ok_and(|objs| {
        Command::new("ld")
            .args(["-r", "--force-group-allocation", "-o"])
            .arg(&merged)
            .args(&objs)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("objcopy")
                .args([
                    "--keep-global-symbol=emu_cnt_wkv7_profile",
                    "--keep-global-symbol=emu_cnt_wkv7_ckpt_tokens",
                    "--keep-global-symbol=emu_cnt_selftest_banks",
                ])
                .arg(&merged)
                .arg(&local)
                .status()
                .is_ok_and(|s| s.success())
            && Command::new("ar")
                .arg("crs")
                .arg(&lib)
                .arg(&local)
                .status()
                .is_ok_and(|s| s.success())
    });
    if ok {
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=rwkv_tune_emu_count");
        println!("cargo:rustc-cfg=emu_counting");
    } else {
        println!("cargo:warning=emulator counting build skipped (needs g++ -fsanitize=thread, GNU ld and objcopy)");
    }
}

/// Job 3: the fatbins (or, without nvcc, an empty table the crate reports).
fn build_fatbins(manifest: &Path, kdir: &Path, out: &Path, cu_files: &[PathBuf]) {
    let nvcc = if env::var_os("RWKV_TUNE_NO_NVCC").is_some() {
        None
    } else {
        find_nvcc(manifest)
    };
    let archs = env::var("RWKV_CUDA_ARCHS").unwrap_or_else(|_| "80,90".to_string());
    let mut rs = String::from("// generated by build.rs\n");
    let mut built = false;
    match &nvcc {
        Some(nvcc) => {
            let cache = fatbin_cache_dir(out);
            for cu in cu_files {
                let stem = cu.file_stem().unwrap().to_string_lossy().to_string();
                let fatbin = out.join(format!("{stem}.fatbin"));
                let cached = cache.as_ref().map(|dir| {
                    dir.join(format!(
                        "{stem}-{:016x}.fatbin",
                        fatbin_key(nvcc, &archs, kdir, cu)
                    ))
                });
                if let Some(c) = cached.as_ref().filter(|c| c.is_file()) {
                    if fs::copy(c, &fatbin).is_ok() {
                        continue;
                    }
                }
                let mut cmd = Command::new(nvcc);
                cmd.arg("-fatbin")
                    .arg("-O3")
                    .arg("-std=c++17")
                    .arg("-lineinfo");
                let mut last = String::new();
                for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
                    last = a.to_string();
                }
                cmd.arg(format!("-gencode=arch=compute_{last},code=compute_{last}"));
                cmd.arg("-I").arg(kdir).arg("-o").arg(&fatbin).arg(cu);
                let res = cmd
                    .output()
                    .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
                if !res.status.success() {
                    panic!(
                        "nvcc failed on {}:\n{}\n{}\n(set RWKV_TUNE_NO_NVCC=1 to build without CUDA kernels)",
                        cu.display(),
                        String::from_utf8_lossy(&res.stdout),
                        String::from_utf8_lossy(&res.stderr)
                    );
                }
                if let Some(c) = &cached {
                    store_in_cache(&fatbin, c);
                }
            }
            built = true;
            println!("cargo:rustc-cfg=kernels_built");
            println!("cargo:rustc-env=RWKV_TUNE_NVCC={}", nvcc.display());
        }
        None => {
            println!(
                "cargo:warning=nvcc not found: CUDA kernels not built (CPU and emulated backends still work). \
                 Run .ci/setup-nvcc or set NVCC=/path/to/nvcc to build them."
            );
            println!("cargo:rustc-env=RWKV_TUNE_NVCC=");
        }
    }
    writeln!(
        rs,
        "/// Fatbins of kernels/*.cu, by file stem (empty when nvcc was not found)."
    )
    .unwrap();
    writeln!(rs, "pub static FATBINS: &[(&str, &[u8])] = &[").unwrap();
    for cu in cu_files {
        let stem = cu.file_stem().unwrap().to_string_lossy().to_string();
        if built {
            let path = out.join(format!("{stem}.fatbin"));
            writeln!(
                rs,
                "    ({stem:?}, include_bytes!({:?})),",
                path.display().to_string()
            )
            .unwrap();
        } else {
            writeln!(rs, "    ({stem:?}, &[]),").unwrap();
        }
    }
    writeln!(rs, "];").unwrap();
    fs::write(out.join("fatbins.rs"), rs).unwrap();
}

/// Where compiled fatbins are kept across feature sets and profiles (each
/// runs this script in its own OUT_DIR): `<target>/rwkv-tune-fatbins/`,
/// found from OUT_DIR = `<target>[/<triple>]/<profile>/build/<pkg>-<hash>/out`.
/// None (no cache) when OUT_DIR does not look like that, or with
/// RWKV_TUNE_NO_FATBIN_CACHE set.
fn fatbin_cache_dir(out: &Path) -> Option<PathBuf> {
    if env::var_os("RWKV_TUNE_NO_FATBIN_CACHE").is_some() {
        return None;
    }
    let build = out.parent()?.parent()?;
    if build.file_name()? != "build" {
        return None;
    }
    Some(build.parent()?.parent()?.join("rwkv-tune-fatbins"))
}

/// Everything a fatbin depends on: the nvcc binary (path, size, mtime), the
/// architectures, the flags, and every file under kernels/ (the .cu file's
/// includes are there).
fn fatbin_key(nvcc: &Path, archs: &str, kdir: &Path, cu: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nvcc.hash(&mut h);
    if let Ok(m) = fs::metadata(nvcc) {
        m.len().hash(&mut h);
        m.modified().ok().hash(&mut h);
    }
    archs.hash(&mut h);
    "-fatbin -O3 -std=c++17 -lineinfo v1".hash(&mut h);
    cu.file_name().hash(&mut h);
    let mut files = Vec::new();
    let mut stack = vec![kdir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        f.strip_prefix(kdir).unwrap_or(&f).hash(&mut h);
        fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Copies `fatbin` to `cached` through a temporary name, so a concurrent
/// build never reads a partial file; failures only cost the cache.
fn store_in_cache(fatbin: &Path, cached: &Path) {
    let Some(dir) = cached.parent() else { return };
    if fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
    if fs::copy(fatbin, &tmp).is_ok() && fs::rename(&tmp, cached).is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    // the pinned PyPI toolkit installed by .ci/setup-nvcc
    if let Ok(rd) = fs::read_dir(manifest.join(".venv-cuda/lib")) {
        for e in rd.flatten() {
            let p = e.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

struct CStruct {
    name: String,
    fields: Vec<(String, String)>, // (c type, name)
}

fn parse_params(src: &str) -> Vec<CStruct> {
    let mut out = Vec::new();
    let mut cur: Option<CStruct> = None;
    for raw in src.lines() {
        let line = raw
            .split("/*")
            .next()
            .unwrap()
            .split("//")
            .next()
            .unwrap()
            .trim();
        if let Some(rest) = line.strip_prefix("typedef struct ") {
            let name = rest.trim_end_matches('{').trim().to_string();
            cur = Some(CStruct {
                name,
                fields: Vec::new(),
            });
        } else if line.starts_with('}') {
            if let Some(s) = cur.take() {
                out.push(s);
            }
        } else if let Some(s) = cur.as_mut() {
            if line.is_empty() {
                continue;
            }
            let decl = line
                .strip_suffix(';')
                .unwrap_or_else(|| panic!("params.h: bad field line `{raw}`"));
            let (ty, name) = decl
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("params.h: bad field `{raw}`"));
            let ty = ty.trim().to_string();
            assert!(
                [
                    "int32_t",
                    "float",
                    "const void*",
                    "void*",
                    "const float*",
                    "float*"
                ]
                .contains(&ty.as_str()),
                "params.h: unsupported field type `{ty}` in `{raw}`"
            );
            s.fields.push((ty, name.trim().to_string()));
        }
    }
    assert!(!out.is_empty(), "params.h: no structs found");
    out
}

fn rust_type(c: &str) -> &'static str {
    match c {
        "int32_t" => "i32",
        "float" => "f32",
        _ => "u64",
    }
}

fn gen_rust(structs: &[CStruct]) -> String {
    let mut s = String::from("// generated by build.rs from kernels/params.h — do not edit\n");
    for st in structs {
        writeln!(
            s,
            "/// Mirror of the C struct `{}` in kernels/params.h (pointers as u64 addresses).",
            st.name
        )
        .unwrap();
        if st.name.contains("Test") {
            // self-test kernels' parameters: for the crate's tests only
            writeln!(s, "#[doc(hidden)]").unwrap();
        }
        writeln!(s, "#[repr(C)]\n#[allow(non_snake_case)]\n#[derive(Clone, Copy, Debug, Default, PartialEq)]\npub struct {} {{", st.name).unwrap();
        for (ty, name) in &st.fields {
            writeln!(s, "    /// `{ty}` in C").unwrap();
            writeln!(s, "    pub {name}: {},", rust_type(ty)).unwrap();
        }
        writeln!(s, "}}").unwrap();
        writeln!(s, "impl {} {{", st.name).unwrap();
        writeln!(s, "    /// Field names in declaration order.").unwrap();
        let names: Vec<String> = st.fields.iter().map(|(_, n)| format!("{n:?}")).collect();
        writeln!(
            s,
            "    pub const FIELDS: &'static [&'static str] = &[{}];",
            names.join(", ")
        )
        .unwrap();
        writeln!(
            s,
            "    /// Rust offsets of the fields, in declaration order."
        )
        .unwrap();
        let offs: Vec<String> = st
            .fields
            .iter()
            .map(|(_, n)| format!("std::mem::offset_of!({}, {n})", st.name))
            .collect();
        writeln!(
            s,
            "    pub const OFFSETS: &'static [usize] = &[{}];",
            offs.join(", ")
        )
        .unwrap();
        writeln!(
            s,
            "    /// The C compiler's layout of this struct: (size, field offsets)."
        )
        .unwrap();
        writeln!(s, "    #[cfg(feature = \"emu\")]").unwrap();
        writeln!(s, "    pub fn c_layout() -> (usize, Vec<usize>) {{").unwrap();
        writeln!(s, "        extern \"C\" {{ fn rwkv_layout_{}(size: *mut usize, offs: *mut usize, cap: usize) -> usize; }}", st.name).unwrap();
        writeln!(s, "        let mut size = 0usize;").unwrap();
        writeln!(
            s,
            "        let mut offs = vec![0usize; {}];",
            st.fields.len()
        )
        .unwrap();
        writeln!(s, "        // SAFETY: the C function (generated params_layout.cpp) writes one size_t to `size`").unwrap();
        writeln!(s, "        // and at most `cap` size_t values to `offs`, which has exactly `cap` elements.").unwrap();
        writeln!(s, "        let n = unsafe {{ rwkv_layout_{}(&mut size, offs.as_mut_ptr(), offs.len()) }};", st.name).unwrap();
        writeln!(s, "        offs.truncate(n);").unwrap();
        writeln!(s, "        (size, offs)").unwrap();
        writeln!(s, "    }}").unwrap();
        writeln!(s, "}}").unwrap();
    }
    s
}

fn gen_layout_cpp(structs: &[CStruct], kdir: &Path) -> String {
    let mut s = String::from(
        "// generated by build.rs — C layout of kernels/params.h, checked by a test\n",
    );
    writeln!(
        s,
        "#include <cstddef>\n#include \"{}\"",
        kdir.join("params.h").display()
    )
    .unwrap();
    for st in structs {
        let offs: Vec<String> = st
            .fields
            .iter()
            .map(|(_, n)| format!("offsetof({}, {n})", st.name))
            .collect();
        writeln!(
            s,
            "extern \"C\" size_t rwkv_layout_{n}(size_t* size, size_t* offs, size_t cap) {{\n  \
             const size_t o[] = {{{o}}};\n  *size = sizeof({n});\n  \
             for (size_t i = 0; i < cap && i < sizeof(o) / sizeof(o[0]); ++i) offs[i] = o[i];\n  \
             return sizeof(o) / sizeof(o[0]);\n}}",
            n = st.name,
            o = offs.join(", ")
        )
        .unwrap();
    }
    s
}
