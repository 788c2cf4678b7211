//! I/O element types of the kernels: f32 and bf16 (state and accumulation are
//! always f32).
use half::bf16;

/// The kernels' I/O dtypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16 (8 exponent, 7 mantissa bits).
    BF16,
}

impl DType {
    /// Name used in kernel symbols (`wkv7_fwd_v1_<name>_n64`).
    pub fn kernel_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// What a device buffer element needs: cudarc's `DeviceRepr` and
/// `ValidAsZeroBits` with feature `cuda`, nothing without it.
#[cfg(feature = "cuda")]
pub trait DeviceElem: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceElem for T {}
/// What a device buffer element needs: cudarc's `DeviceRepr` and
/// `ValidAsZeroBits` with feature `cuda`, nothing without it.
#[cfg(not(feature = "cuda"))]
pub trait DeviceElem {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceElem for T {}

/// An element type the kernels read and write.
pub trait IoType: Copy + Default + Send + Sync + 'static + std::fmt::Debug + DeviceElem {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widen to f32.
    fn to_f32(self) -> f32;
    /// Narrow from f32 (round to nearest even for bf16).
    fn from_f32(x: f32) -> Self;
}

impl IoType for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl IoType for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
