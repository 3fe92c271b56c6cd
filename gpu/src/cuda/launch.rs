//! Kernel launches through `cuLaunchKernelEx`, with programmatic dependent launch on GPUs that
//! have it (compute capability 9.0 and later): a kernel's blocks may start while the kernel
//! before it on the stream is still finishing, so a decode step of many small kernels does not
//! pay each kernel's launch and ramp in series. Every kernel in `gpu/kernels/` calls
//! `pdl_wait()` (`griddepcontrol.wait`: the grids before it finished and their writes are
//! visible) before it reads anything an earlier op wrote and before it writes anything; only
//! weights, which nothing writes during a step, are read before it. Launched without the
//! attribute (older GPUs) the wait returns at once and kernels run in stream order as usual.

use std::ffi::c_void;

use cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig,
};

/// Most parameters a kernel of ours takes (`qkv_prepare` has 19), held inline so a launch
/// allocates nothing.
const MAX_PARAMS: usize = 24;

/// One kernel launch being built: its arguments, each held as the bytes the kernel reads.
pub(crate) struct Launch<'a> {
    func: &'a CudaFunction,
    stream: &'a CudaStream,
    dependent: bool,
    words: [u64; MAX_PARAMS],
    /// Parameters given so far (more than MAX_PARAMS fails the launch).
    count: usize,
}

impl<'a> Launch<'a> {
    /// A launch of `func` on `stream`; `dependent`: with programmatic dependent launch.
    pub(crate) fn new(func: &'a CudaFunction, stream: &'a CudaStream, dependent: bool) -> Self {
        Launch {
            func,
            stream,
            dependent,
            words: [0; MAX_PARAMS],
            count: 0,
        }
    }

    /// Appends the next kernel parameter.
    pub(crate) fn arg<A: KernelArg>(&mut self, a: A) -> &mut Self {
        let w = a.word(self.stream);
        if let Some(slot) = self.words.get_mut(self.count) {
            *slot = w;
        }
        self.count += 1;
        self
    }

    /// Launches the kernel with `cfg`.
    ///
    /// # Safety
    /// The arguments must be the kernel's parameters in order and type, every device buffer
    /// large enough for what the kernel does with `cfg`, and alive until the stream ran it.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        // Each parameter is read from its own 8-byte word: a pointer or 64-bit value whole,
        // a 32-bit value from the word's low four bytes (x86-64 and aarch64 are little-endian).
        if self.count > MAX_PARAMS {
            return Err(DriverError(sys::CUresult::CUDA_ERROR_INVALID_VALUE));
        }
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_PARAMS];
        for (p, w) in params.iter_mut().zip(&mut self.words) {
            *p = (w as *mut u64).cast();
        }
        // SAFETY: an all-zero attribute value is valid for every member of the union.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.dependent),
        };
        self.stream.context().bind_to_thread()?;
        // SAFETY: `config` and `params` outlive the call, which copies both; each parameter
        // points at its word; the caller vouches for the arguments (above).
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

/// A value a kernel takes as a parameter, as the 8-byte word it is passed in.
pub(crate) trait KernelArg {
    /// The word (a device address, or the value in its low bytes).
    fn word(self, stream: &CudaStream) -> u64;
}

impl<T> KernelArg for &CudaSlice<T> {
    fn word(self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for &mut CudaSlice<T> {
    fn word(self, stream: &CudaStream) -> u64 {
        self.device_ptr_mut(stream).0
    }
}

impl<T> KernelArg for &CudaView<'_, T> {
    fn word(self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for &mut CudaViewMut<'_, T> {
    fn word(self, stream: &CudaStream) -> u64 {
        self.device_ptr_mut(stream).0
    }
}

impl KernelArg for &i32 {
    fn word(self, _: &CudaStream) -> u64 {
        u64::from(*self as u32)
    }
}

impl KernelArg for &u32 {
    fn word(self, _: &CudaStream) -> u64 {
        u64::from(*self)
    }
}

impl KernelArg for &f32 {
    fn word(self, _: &CudaStream) -> u64 {
        u64::from(self.to_bits())
    }
}

impl KernelArg for &i64 {
    fn word(self, _: &CudaStream) -> u64 {
        *self as u64
    }
}

impl KernelArg for &u64 {
    fn word(self, _: &CudaStream) -> u64 {
        *self
    }
}
