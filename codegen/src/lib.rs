//! The build step that turns `kernels-gpu` into PTX (the role of rust-cuda's `cuda_builder`).
//!
//! [`build`] compiles the kernel crate with rustc's own `nvptx64-nvidia-cuda` backend
//! (`-Zbuild-std=core --emit=asm`, `RUSTC_BOOTSTRAP=1`) once per GPU architecture of
//! [`TARGETS`], each in its own target directory, so the outer cargo is not blocked and each
//! build stays cached; checks that no kernel kept a panic path and that every architecture has
//! the same kernels; assembles each PTX with `ptxas` for its architecture when one is found
//! (failing on any spill or stack frame); and writes a Rust file that embeds the PTX modules
//! and names every kernel entry. `host/build.rs` calls it.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One GPU architecture the kernels are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtxTarget {
    /// rustc's `-Ctarget-cpu` and ptxas' `-arch` (`sm_90`).
    pub cpu: &'static str,
    /// Compute capability times ten (90), the number in the generated names (`PTX_SM90`).
    pub arch: u32,
    /// PTX ISA version asked of LLVM (`-Ctarget-feature`).
    pub ptx_feature: &'static str,
}

/// Every architecture built, oldest first.
///
/// - sm_80 (A100) asks for PTX ISA 7.8, so that any driver from CUDA 11.8 on (12.4
///   included) can JIT it; sm_89 (L40S, RTX 4090) asks for ISA 8.1 (CUDA 12.1 on), the lowest
///   with the fp8 conversions (`cvt...e4m3x2`) on sm_89. The kernels compile their
///   thread-block-cluster code out for both (`target_feature = "sm_90"`), and sm_80 converts
///   fp8 in software.
/// - sm_90 (H100, H200) asks for ISA 8.6: it names the cluster-scope fences restricted to
///   shared memory (`fence.release.sync_restrict::shared::cta.cluster`) that a cheap cluster
///   barrier needs; driver 570 and later (CUDA 12.8) load it.
pub const TARGETS: [PtxTarget; 3] = [
    PtxTarget {
        cpu: "sm_80",
        arch: 80,
        ptx_feature: "+ptx78",
    },
    PtxTarget {
        cpu: "sm_89",
        arch: 89,
        ptx_feature: "+ptx81",
    },
    PtxTarget {
        cpu: "sm_90",
        arch: 90,
        ptx_feature: "+ptx86",
    },
];
const TARGET: &str = "nvptx64-nvidia-cuda";

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error(
        "the Rust standard library sources are missing from {sysroot}: \
         building the kernels for nvptx64 needs them; run `rustup component add rust-src`"
    )]
    MissingRustSrc { sysroot: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed with {status}:\n{output}")]
    CommandFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error("no PTX found in {0} after building the kernels")]
    PtxMissing(PathBuf),
    #[error("the PTX has no kernel entry points")]
    NoKernels,
    #[error(
        "the PTX calls functions it does not define ({0}); a kernel kept a panic path \
         (an unchecked division, index or unwrap). Make the device code panic-free"
    )]
    UnresolvedCalls(String),
    #[error(
        "ptxas reports local memory in kernels for {target} (a spill or stack frame is a bug \
         to explain):\n{kernels}"
    )]
    LocalMemory {
        target: &'static str,
        kernels: String,
    },
    #[error(
        "the {target} PTX does not have the kernels of the {reference} PTX: only in \
         {reference}: [{missing}]; only in {target}: [{extra}]"
    )]
    KernelSetMismatch {
        target: &'static str,
        reference: &'static str,
        missing: String,
        extra: String,
    },
    #[error("building for {target}: {source}")]
    ForTarget {
        target: &'static str,
        source: Box<CodegenError>,
    },
    #[error("the launch bound for entries starting with `{0}` names no kernel entry in the PTX")]
    UnusedLaunchBound(String),
    #[error(
        "the kernels named `{0}_...` carry different parameters (`_g<group>`, `_d<head_dim>`): \
         one lookup function cannot cover them"
    )]
    FamilyShape(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What ptxas reported for one kernel entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

impl KernelResources {
    pub fn uses_local_memory(&self) -> bool {
        self.stack_frame_bytes > 0 || self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

impl fmt::Display for KernelResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} registers, {} B stack, {} B spill stores, {} B spill loads",
            self.name,
            self.registers,
            self.stack_frame_bytes,
            self.spill_store_bytes,
            self.spill_load_bytes
        )
    }
}

/// Where to build from and to.
#[derive(Clone, Debug)]
pub struct BuildConfig {
    /// The kernel crate (`kernels-gpu`).
    pub kernel_crate: PathBuf,
    /// Target directory of the nested cargo (kept apart from the outer build's lock).
    pub target_dir: PathBuf,
    /// Where the PTX, the cubin and the generated Rust file go (`OUT_DIR`).
    pub out_dir: PathBuf,
    /// `cargo` to run (`CARGO` in a build script).
    pub cargo: PathBuf,
    /// `rustc` whose sysroot must hold `rust-src` (`RUSTC` in a build script).
    pub rustc: PathBuf,
    /// `ptxas` to check with, if any.
    pub ptxas: Option<PathBuf>,
    /// Most threads per block of the entries starting with each prefix (`.maxntid`; see
    /// [`apply_launch_bounds`]).
    pub launch_bounds: Vec<(String, u32)>,
}

/// What a build produced.
#[derive(Clone, Debug)]
pub struct BuildOutput {
    /// One module per entry of [`TARGETS`], in that order.
    pub modules: Vec<ModuleOutput>,
    pub bindings: PathBuf,
    /// The kernel entries, the same in every module (in the sm_90 module's order).
    pub kernels: Vec<String>,
}

/// The PTX of one architecture.
#[derive(Clone, Debug)]
pub struct ModuleOutput {
    pub target: PtxTarget,
    /// `kernels_sm80.ptx` and so on, in `OUT_DIR`.
    pub ptx: PathBuf,
    /// Per-kernel resources when ptxas ran.
    pub resources: Option<Vec<KernelResources>>,
}

/// Builds the kernels to PTX for every architecture of [`TARGETS`], checks them and writes
/// the bindings file `kernels.rs`.
///
/// The three nested builds run at once, each in `target_dir/<cpu>` (a build per directory
/// keeps every one cached: cargo would rebuild the kernel crate whenever the
/// `-Ctarget-cpu` of one shared directory changed); the outer jobserver bounds their threads.
pub fn build(config: &BuildConfig) -> Result<BuildOutput, CodegenError> {
    check_rust_src(&config.rustc)?;
    let results: Vec<Result<(ModuleOutput, Vec<String>), CodegenError>> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = TARGETS
                .iter()
                .map(|target| scope.spawn(move || build_module(config, target)))
                .collect();
            handles
                .into_iter()
                .zip(TARGETS)
                .map(|(handle, target)| {
                    handle.join().unwrap_or_else(|_| {
                        Err(CodegenError::ForTarget {
                            target: target.cpu,
                            source: Box::new(CodegenError::NoKernels),
                        })
                    })
                })
                .collect()
        });
    let mut modules = Vec::with_capacity(TARGETS.len());
    let mut kernel_sets = Vec::with_capacity(TARGETS.len());
    for result in results {
        let (module, kernels) = result?;
        modules.push(module);
        kernel_sets.push(kernels);
    }
    // The newest architecture is the reference: the host names kernels by its entries.
    let reference = TARGETS.len() - 1;
    for (index, kernels) in kernel_sets.iter().enumerate() {
        check_same_kernels(
            TARGETS[index].cpu,
            kernels,
            TARGETS[reference].cpu,
            &kernel_sets[reference],
        )?;
    }
    let kernels = kernel_sets.swap_remove(reference);
    let bindings = config.out_dir.join("kernels.rs");
    let paths: Vec<(PtxTarget, &Path)> = modules
        .iter()
        .map(|module| (module.target, module.ptx.as_path()))
        .collect();
    write(&bindings, &generate_bindings(&kernels, &paths)?)?;
    Ok(BuildOutput {
        modules,
        bindings,
        kernels,
    })
}

/// Compiles, checks and writes the PTX of one architecture; errors name it.
fn build_module(
    config: &BuildConfig,
    target: &PtxTarget,
) -> Result<(ModuleOutput, Vec<String>), CodegenError> {
    let in_target = |source| match source {
        CodegenError::LocalMemory { .. } | CodegenError::ForTarget { .. } => source,
        source => CodegenError::ForTarget {
            target: target.cpu,
            source: Box::new(source),
        },
    };
    let ptx_source = compile_ptx(config, target).map_err(in_target)?;
    let ptx = std::fs::read_to_string(&ptx_source).map_err(|source| {
        in_target(CodegenError::Io {
            path: ptx_source.clone(),
            source,
        })
    })?;
    check_no_unresolved_calls(&ptx).map_err(in_target)?;
    let ptx = apply_launch_bounds(&ptx, &config.launch_bounds).map_err(in_target)?;
    let kernels = kernel_entries(&ptx);
    if kernels.is_empty() {
        return Err(in_target(CodegenError::NoKernels));
    }
    let name = target.cpu.replace('_', "");
    let ptx_path = config.out_dir.join(format!("kernels_{name}.ptx"));
    write(&ptx_path, &ptx).map_err(in_target)?;
    let resources = match &config.ptxas {
        Some(ptxas) => Some(
            check_with_ptxas(
                ptxas,
                target.cpu,
                &ptx_path,
                &config.out_dir.join(format!("kernels_{name}.cubin")),
            )
            .map_err(in_target)?,
        ),
        None => None,
    };
    Ok((
        ModuleOutput {
            target: *target,
            ptx: ptx_path,
            resources,
        },
        kernels,
    ))
}

/// Fails unless `kernels` (of `target`) and `reference_kernels` name the same entries.
pub fn check_same_kernels(
    target: &'static str,
    kernels: &[String],
    reference: &'static str,
    reference_kernels: &[String],
) -> Result<(), CodegenError> {
    let only_in = |a: &[String], b: &[String]| {
        a.iter()
            .filter(|name| !b.contains(name))
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing = only_in(reference_kernels, kernels);
    let extra = only_in(kernels, reference_kernels);
    if missing.is_empty() && extra.is_empty() {
        Ok(())
    } else {
        Err(CodegenError::KernelSetMismatch {
            target,
            reference,
            missing,
            extra,
        })
    }
}

fn write(path: &Path, contents: &str) -> Result<(), CodegenError> {
    std::fs::write(path, contents).map_err(|source| CodegenError::Io {
        path: path.to_owned(),
        source,
    })
}

fn run(command: &mut Command) -> Result<std::process::Output, CodegenError> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|source| CodegenError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(CodegenError::CommandFailed {
            command: shown,
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(output)
}

/// Fails with the `rustup component add rust-src` hint when the sysroot lacks `core`'s source.
pub fn check_rust_src(rustc: &Path) -> Result<(), CodegenError> {
    let output = run(Command::new(rustc).args(["--print", "sysroot"]))?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.is_file() {
        Ok(())
    } else {
        Err(CodegenError::MissingRustSrc { sysroot })
    }
}

/// Variables a build script inherits from the outer cargo that would redirect or wrap the
/// nested build (target, flags, clippy's wrapper, the outer package's metadata).
fn is_outer_build_variable(name: &str) -> bool {
    const KEEP: [&str; 3] = ["CARGO_HOME", "CARGO_MAKEFLAGS", "CARGO_NET_OFFLINE"];
    if KEEP.contains(&name) {
        return false;
    }
    name.starts_with("CARGO_")
        || name.starts_with("RUSTC_")
        || name.starts_with("DEP_")
        || matches!(
            name,
            "RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "TARGET"
                | "HOST"
                | "OUT_DIR"
                | "OPT_LEVEL"
                | "PROFILE"
                | "DEBUG"
                | "NUM_JOBS"
        )
}

fn compile_ptx(config: &BuildConfig, target: &PtxTarget) -> Result<PathBuf, CodegenError> {
    let target_dir = config.target_dir.join(target.cpu);
    let mut command = Command::new(&config.cargo);
    for (name, _) in std::env::vars_os() {
        if is_outer_build_variable(&name.to_string_lossy()) {
            command.env_remove(&name);
        }
    }
    command
        .current_dir(&config.kernel_crate)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", &config.rustc)
        .arg("rustc")
        .arg("--release")
        .args(["--target", TARGET])
        .arg("-Zbuild-std=core")
        .arg("--manifest-path")
        .arg(config.kernel_crate.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--config", "profile.release.panic=\"abort\""])
        .args(["--config", "profile.release.codegen-units=1"])
        .args(["--config", "profile.release.debug=false"])
        .arg("--")
        .arg("--emit=asm")
        .arg(OsString::from(format!("-Ctarget-cpu={}", target.cpu)))
        .arg(OsString::from(format!(
            "-Ctarget-feature={}",
            target.ptx_feature
        )))
        // Register arrays must be indexed by constants: unroll the kernels' small fixed loops
        // (head groups, vector lanes) fully, or they fall back to local memory.
        .arg("-Cllvm-args=-unroll-threshold=2000");
    run(&mut command)?;
    newest_ptx(&target_dir.join(TARGET).join("release").join("deps"))
}

fn newest_ptx(deps: &Path) -> Result<PathBuf, CodegenError> {
    let entries = std::fs::read_dir(deps).map_err(|source| CodegenError::Io {
        path: deps.to_owned(),
        source,
    })?;
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with("shadowkv_kernels-") && name.ends_with(".s")
        })
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .max()
        .map(|(_, path)| path)
        .ok_or_else(|| CodegenError::PtxMissing(deps.to_owned()))
}

/// Writes `.maxntid threads, 1, 1` (the PTX of CUDA's `__launch_bounds__`) after the
/// parameter list of every entry whose name starts with one of `bounds`' prefixes: ptxas and
/// the driver's JIT then keep the kernel within the registers a block of that size can have.
/// A prefix that names no entry is an error (a renamed kernel would lose its bound silently).
pub fn apply_launch_bounds(ptx: &str, bounds: &[(String, u32)]) -> Result<String, CodegenError> {
    let mut out = String::with_capacity(ptx.len() + 64 * bounds.len());
    let mut used = vec![false; bounds.len()];
    // The bound of the entry whose parameter list is open, until its closing `)`.
    let mut pending = None;
    for line in ptx.lines() {
        out.push_str(line);
        out.push('\n');
        if let Some(name) = entry_name(line) {
            pending = bounds
                .iter()
                .position(|(prefix, _)| name.starts_with(prefix.as_str()));
        }
        if line.trim() == ")" {
            if let Some(index) = pending.take() {
                used[index] = true;
                out.push_str(&format!(".maxntid {}, 1, 1\n", bounds[index].1));
            }
        }
    }
    match used.iter().position(|&used| !used) {
        Some(index) => Err(CodegenError::UnusedLaunchBound(bounds[index].0.clone())),
        None => Ok(out),
    }
}

/// The kernel name of a PTX line that opens an `.entry`, if it is one.
fn entry_name(line: &str) -> Option<&str> {
    let rest = line.trim_start();
    let rest = rest.strip_prefix(".visible ").unwrap_or(rest);
    let rest = rest.strip_prefix(".entry ")?;
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// Names of every `.entry` (kernel) in a PTX module, in order.
pub fn kernel_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(entry_name)
        .map(str::to_owned)
        .collect()
}

/// Fails when the PTX declares functions it does not define: rustc leaves panic paths as
/// `.extern .func` calls into `core`, which is not linked into the module.
pub fn check_no_unresolved_calls(ptx: &str) -> Result<(), CodegenError> {
    let unresolved: Vec<&str> = ptx
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix(".extern .func "))
        .map(|rest| rest.split(['(', ' ']).next().unwrap_or(rest))
        .filter(|name| {
            ptx.contains(&format!("call.uni {name}")) || ptx.contains(&format!("{name},"))
        })
        .collect();
    if unresolved.is_empty() {
        Ok(())
    } else {
        Err(CodegenError::UnresolvedCalls(unresolved.join(", ")))
    }
}

/// Finds `ptxas`: the `PTXAS` variable, then `PATH`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PTXAS").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("ptxas"))
        .find(|candidate| candidate.is_file())
}

/// Assembles the PTX for `arch` (`sm_90`) and fails on any kernel that uses local memory.
pub fn check_with_ptxas(
    ptxas: &Path,
    arch: &'static str,
    ptx: &Path,
    cubin: &Path,
) -> Result<Vec<KernelResources>, CodegenError> {
    let output = run(Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(ptx)
        .arg("-o")
        .arg(cubin))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let resources = parse_ptxas_report(&report);
    check_local_memory(arch, &resources)?;
    Ok(resources)
}

/// Fails when any kernel spills or has a stack frame, naming each one and the architecture.
pub fn check_local_memory(
    target: &'static str,
    resources: &[KernelResources],
) -> Result<(), CodegenError> {
    let offenders: Vec<String> = resources
        .iter()
        .filter(|kernel| kernel.uses_local_memory())
        .map(|kernel| format!("  {kernel}"))
        .collect();
    if offenders.is_empty() {
        Ok(())
    } else {
        Err(CodegenError::LocalMemory {
            target,
            kernels: offenders.join("\n"),
        })
    }
}

/// Parses `ptxas -v` output into per-entry resources.
pub fn parse_ptxas_report(report: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line
            .strip_prefix("ptxas info")
            .and_then(|r| r.split_once("Compiling entry function '"))
        {
            let name = rest.1.split('\'').next().unwrap_or_default();
            kernels.push(KernelResources {
                name: name.to_owned(),
                ..KernelResources::default()
            });
            continue;
        }
        let Some(current) = kernels.last_mut() else {
            continue;
        };
        if line.contains("bytes stack frame") {
            current.stack_frame_bytes = number_before(line, "bytes stack frame");
            current.spill_store_bytes = number_before(line, "bytes spill stores");
            current.spill_load_bytes = number_before(line, "bytes spill loads");
        } else if let Some(rest) = line.split_once("Used ") {
            current.registers = rest
                .1
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    kernels
}

fn number_before(line: &str, label: &str) -> u32 {
    line.split_once(label)
        .and_then(|(before, _)| before.split([',', ' ']).rev().find(|w| !w.is_empty()))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A parameter that kernel names carry as a trailing `_<letter><number>` segment.
struct FamilyParameter {
    letter: char,
    name: &'static str,
}

/// The parameters a kernel family's lookup function takes, in the order they appear in names
/// (`decode_attention_g4_d128`).
const FAMILY_PARAMETERS: [FamilyParameter; 2] = [
    FamilyParameter {
        letter: 'g',
        name: "group",
    },
    FamilyParameter {
        letter: 'd',
        name: "head_dim",
    },
];

/// A kernel name split into its family and the values of its trailing parameters (`None`
/// for a parameter it does not carry), or `None` for a name with no parameter.
fn split_family(kernel: &str) -> Option<(&str, [Option<u32>; 2])> {
    let mut values = [None; 2];
    let mut base = kernel;
    for (index, parameter) in FAMILY_PARAMETERS.iter().enumerate().rev() {
        let Some((rest, segment)) = base.rsplit_once('_') else {
            break;
        };
        let Some(digits) = segment.strip_prefix(parameter.letter) else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        values[index] = digits.parse().ok();
        base = rest;
    }
    values.iter().any(Option::is_some).then_some((base, values))
}

/// Lookup functions for the kernel families: every set of entries that differ only in their
/// trailing `_g<group>` / `_d<head_dim>` segments gets `fn <family>(group, head_dim) ->
/// Result<KernelName>` that matches over the compiled values and is a `MissingKernel` error
/// (through the including module's `missing_kernel`) for the rest.
fn generate_families(kernels: &[String]) -> Result<String, CodegenError> {
    type Members<'a> = Vec<([Option<u32>; 2], &'a str)>;
    let mut families: Vec<(&str, Members)> = Vec::new();
    for kernel in kernels {
        let Some((base, values)) = split_family(kernel) else {
            continue;
        };
        match families.iter_mut().find(|(name, _)| *name == base) {
            Some((_, members)) => {
                let shape = |v: &[Option<u32>; 2]| v.map(|value| value.is_some());
                if shape(&members[0].0) != shape(&values) {
                    return Err(CodegenError::FamilyShape(base.to_owned()));
                }
                members.push((values, kernel));
            }
            None => families.push((base, vec![(values, kernel)])),
        }
    }
    let mut source = String::new();
    for (base, members) in families {
        let used: Vec<&FamilyParameter> = FAMILY_PARAMETERS
            .iter()
            .enumerate()
            .filter(|(index, _)| members[0].0[*index].is_some())
            .map(|(_, parameter)| parameter)
            .collect();
        let pattern: String = used
            .iter()
            .map(|p| format!("_{}{{{}}}", p.letter, p.name))
            .collect();
        let arguments: Vec<String> = used.iter().map(|p| format!("{}: u32", p.name)).collect();
        let names: Vec<&str> = used.iter().map(|p| p.name).collect();
        let scrutinee = if names.len() == 1 {
            names[0].to_owned()
        } else {
            format!("({})", names.join(", "))
        };
        source.push_str(&format!(
            "\n/// The `{base}{pattern}` kernel, or [`Error::MissingKernel`] for values not compiled.\n\
             pub fn {base}({}) -> Result<KernelName> {{\n    match {scrutinee} {{\n",
            arguments.join(", ")
        ));
        for (values, kernel) in &members {
            let values: Vec<String> = values.iter().flatten().map(u32::to_string).collect();
            let pattern_values = if values.len() == 1 {
                values[0].clone()
            } else {
                format!("({})", values.join(", "))
            };
            source.push_str(&format!(
                "        {pattern_values} => Ok({}),\n",
                kernel.to_uppercase()
            ));
        }
        source.push_str(&format!(
            "        _ => Err(missing_kernel(format!(\"{base}{pattern}\"))),\n    }}\n}}\n"
        ));
    }
    Ok(source)
}

/// The Rust source that embeds the PTX modules and names each kernel; included by the host
/// inside the module that defines `KernelName`, `Result` and `missing_kernel(String) -> Error`.
pub fn generate_bindings(
    kernels: &[String],
    modules: &[(PtxTarget, &Path)],
) -> Result<String, CodegenError> {
    let mut source =
        String::from("// Generated by shadowkv-codegen from kernels-gpu. Do not edit.\n\n");
    for (target, ptx) in modules {
        source.push_str(&format!(
            "/// PTX of every kernel for {}, built by rustc's nvptx64 backend ({}).\n\
             pub const PTX_SM{}: &str = include_str!({:?});\n\n",
            target.cpu,
            target.ptx_feature,
            target.arch,
            ptx.display().to_string()
        ));
    }
    source.push_str(
        "/// Every PTX module as (compute capability times ten, PTX), oldest architecture first.\n\
         pub const MODULES: &[(u32, &str)] = &[\n",
    );
    for (target, _) in modules {
        source.push_str(&format!("    ({0}, PTX_SM{0}),\n", target.arch));
    }
    source.push_str("];\n\n");
    for kernel in kernels {
        source.push_str(&format!(
            "/// The kernel entry `{kernel}`.\npub const {}: KernelName = KernelName({kernel:?});\n",
            kernel.to_uppercase()
        ));
    }
    source.push_str(
        "\n/// Every kernel entry, the same in each module of [`MODULES`].\n\
         pub const ALL: &[KernelName] = &[\n",
    );
    for kernel in kernels {
        source.push_str(&format!("    {},\n", kernel.to_uppercase()));
    }
    source.push_str("];\n");
    source.push_str(&generate_families(kernels)?);
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = "\
.version 7.8
.target sm_90
.address_size 64
.visible .func _ZN4core9panicking5panic(
.visible .entry decode_attention_g1_d64(
\t.param .align 8 .b8 decode_attention_g1_d64_param_0[72]
)
{
}
.entry plain_entry(
)
{
}
";

    #[test]
    fn launch_bounds_follow_the_parameter_list_of_matching_entries() {
        let bounds = [("decode_".to_owned(), 1024)];
        let bounded = apply_launch_bounds(PTX, &bounds).unwrap();
        assert!(bounded.contains("_param_0[72]\n)\n.maxntid 1024, 1, 1\n{"));
        assert_eq!(bounded.matches(".maxntid").count(), 1);
        assert!(matches!(
            apply_launch_bounds(PTX, &[("topk_".to_owned(), 1024)]),
            Err(CodegenError::UnusedLaunchBound(prefix)) if prefix == "topk_"
        ));
    }

    #[test]
    fn finds_every_kernel_entry_and_no_functions() {
        assert_eq!(
            kernel_entries(PTX),
            ["decode_attention_g1_d64", "plain_entry"]
        );
    }

    #[test]
    fn bindings_name_every_kernel_and_module() {
        let modules = [
            (TARGETS[0], Path::new("/x/kernels_sm80.ptx")),
            (TARGETS[2], Path::new("/x/kernels_sm90.ptx")),
        ];
        let source = generate_bindings(&kernel_entries(PTX), &modules).unwrap();
        assert!(source.contains(
            "pub const DECODE_ATTENTION_G1_D64: KernelName = KernelName(\"decode_attention_g1_d64\");"
        ));
        assert!(source.contains("pub const PLAIN_ENTRY: KernelName"));
        assert!(source.contains("pub const PTX_SM80: &str = include_str!(\"/x/kernels_sm80.ptx\")"));
        assert!(source.contains("pub const PTX_SM90: &str = include_str!(\"/x/kernels_sm90.ptx\")"));
        assert!(source.contains("    (80, PTX_SM80),\n    (90, PTX_SM90),\n"));
    }

    #[test]
    fn families_get_lookup_functions_over_their_parameters() {
        let kernels: Vec<String> = [
            "decode_attention_g1_d64",
            "decode_attention_g2_d128",
            "topk_select_g3",
            "prefill_attention_bf16p_w4_d128",
            "fill_random_bf16",
        ]
        .map(String::from)
        .to_vec();
        let source = generate_families(&kernels).unwrap();
        assert!(
            source.contains(
                "pub fn decode_attention(group: u32, head_dim: u32) -> Result<KernelName> {\n    \
             match (group, head_dim) {\n        (1, 64) => Ok(DECODE_ATTENTION_G1_D64),\n        \
             (2, 128) => Ok(DECODE_ATTENTION_G2_D128),\n        \
             _ => Err(missing_kernel(format!(\"decode_attention_g{group}_d{head_dim}\"))),"
            ),
            "{source}"
        );
        assert!(
            source.contains("pub fn topk_select(group: u32)"),
            "{source}"
        );
        assert!(
            source.contains("        3 => Ok(TOPK_SELECT_G3),"),
            "{source}"
        );
        assert!(
            source.contains("pub fn prefill_attention_bf16p_w4(head_dim: u32)"),
            "{source}"
        );
        assert!(!source.contains("fill_random"), "{source}");
        let mixed = ["x_g1_d64".to_owned(), "x_d128".to_owned()];
        assert!(matches!(
            generate_families(&mixed),
            Err(CodegenError::FamilyShape(family)) if family == "x"
        ));
    }

    #[test]
    fn kernel_sets_must_match_across_targets() {
        let a = ["k1".to_owned(), "k2".to_owned()];
        let b = ["k2".to_owned(), "k1".to_owned()];
        assert!(check_same_kernels("sm_80", &a, "sm_90", &b).is_ok());
        let error = check_same_kernels("sm_80", &a[..1], "sm_90", &b).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("sm_80") && message.contains("only in sm_90: [k2]"),
            "{message}"
        );
    }

    #[test]
    fn targets_keep_hopper_at_isa_8_6_and_the_rest_jit_able_by_cuda_12_4() {
        assert_eq!(TARGETS[2].cpu, "sm_90");
        assert_eq!(TARGETS[2].ptx_feature, "+ptx86");
        for target in &TARGETS[..2] {
            let version: u32 = target.ptx_feature["+ptx".len()..].parse().unwrap();
            assert!(version <= 84, "{target:?}");
        }
    }

    #[test]
    fn panic_paths_are_rejected() {
        let with_call = "\
.extern .func _RNvNtNtCs_4core9panicking11panic_const23panic_const_div_by_zero
(
);
.visible .entry k()
{
\tcall.uni _RNvNtNtCs_4core9panicking11panic_const23panic_const_div_by_zero, ();
}
";
        let error = check_no_unresolved_calls(with_call).unwrap_err();
        assert!(
            error.to_string().contains("panic_const_div_by_zero"),
            "{error}"
        );
        assert!(check_no_unresolved_calls(PTX).is_ok());
    }

    const REPORT: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'clean' for 'sm_90'
ptxas info    : Function properties for clean
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers
ptxas info    : Compiling entry function 'spills' for 'sm_90'
ptxas info    : Function properties for spills
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 48 bytes cumulative stack size
";

    #[test]
    fn parses_registers_stack_and_spills() {
        let resources = parse_ptxas_report(REPORT);
        assert_eq!(
            resources,
            [
                KernelResources {
                    name: "clean".into(),
                    registers: 64,
                    ..Default::default()
                },
                KernelResources {
                    name: "spills".into(),
                    registers: 255,
                    stack_frame_bytes: 48,
                    spill_store_bytes: 40,
                    spill_load_bytes: 36,
                },
            ]
        );
    }

    #[test]
    fn spills_fail_the_check_and_name_the_kernel() {
        let error = check_local_memory("sm_89", &parse_ptxas_report(REPORT)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("for sm_89"), "{message}");
        assert!(
            message.contains("spills: 255 registers, 48 B stack"),
            "{message}"
        );
        assert!(!message.contains("clean"), "{message}");
    }

    /// A crafted PTX kernel whose array lives in local memory, run through the real ptxas
    /// when one is installed.
    #[test]
    fn real_ptxas_detects_a_stack_frame() {
        let Some(ptxas) = find_ptxas() else {
            eprintln!("skipped: no ptxas on PATH or in PTXAS");
            return;
        };
        let dir =
            std::env::temp_dir().join(format!("shadowkv-codegen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ptx = dir.join("local.ptx");
        std::fs::write(
            &ptx,
            "\
.version 7.8
.target sm_90
.address_size 64
.visible .entry uses_local(.param .u64 out, .param .u32 index)
{
\t.local .align 4 .b8 scratch[64];
\t.reg .b32 %r<4>;
\t.reg .b64 %rd<6>;
\tld.param.u64 %rd1, [out];
\tld.param.u32 %r1, [index];
\tmov.u64 %rd2, scratch;
\tmul.wide.u32 %rd3, %r1, 4;
\tadd.s64 %rd4, %rd2, %rd3;
\tst.local.u32 [%rd4], %r1;
\tld.local.u32 %r2, [scratch+4];
\tcvta.to.global.u64 %rd5, %rd1;
\tst.global.u32 [%rd5], %r2;
\tret;
}
",
        )
        .unwrap();
        let error = check_with_ptxas(&ptxas, "sm_90", &ptx, &dir.join("local.cubin")).unwrap_err();
        assert!(matches!(error, CodegenError::LocalMemory { .. }), "{error}");
        assert!(error.to_string().contains("uses_local"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn outer_cargo_variables_are_dropped_but_the_jobserver_kept() {
        assert!(is_outer_build_variable("CARGO_TARGET_DIR"));
        assert!(is_outer_build_variable("RUSTC_WORKSPACE_WRAPPER"));
        assert!(is_outer_build_variable("RUSTFLAGS"));
        assert!(is_outer_build_variable("CARGO_ENCODED_RUSTFLAGS"));
        assert!(!is_outer_build_variable("CARGO_MAKEFLAGS"));
        assert!(!is_outer_build_variable("CARGO_HOME"));
        assert!(!is_outer_build_variable("PATH"));
    }
}
