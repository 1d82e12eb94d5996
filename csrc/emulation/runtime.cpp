// The CUDA emulator's runtime: a launch runs its blocks one after another; the threads of a block
// are fibers (own stacks, switched by hand) that run until they reach a barrier or a warp collective
// and then hand over to the next runnable thread. The last thread to arrive at a barrier releases the
// block; the last lane to arrive at a collective computes it for every lane of the mask. When no
// thread can run but some have not exited, the launch stops with an error that says who waits for
// whom. Errors are c10::Errors (Python RuntimeErrors) naming the kernel, its block and thread.
#include "cuda_emulation.h"

#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define VKERNELS_EMULATION_ASAN 1
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace vkernels::emulation {
namespace {

// ---------------------------------------------------------------------------------------------
// Context switch: x86-64 saves the callee-saved registers on the old stack and swaps stack
// pointers (tens of cycles); elsewhere POSIX ucontext (a system call per switch).
// ---------------------------------------------------------------------------------------------

#if defined(__x86_64__)
asm(R"(
.text
.p2align 4
.type vkernels_emulation_switch, @function
vkernels_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size vkernels_emulation_switch, .-vkernels_emulation_switch
)");
extern "C" void vkernels_emulation_switch(void** save, void* load);

struct Context {
  void* sp = nullptr;
};
// A context that starts `entry` on the stack [stack, stack + size).
void prepare(Context& context, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15});
  *--top = nullptr;                             // entry's return address: the end of the stack for unwinders
  *--top = reinterpret_cast<void*>(entry);      // where the switch returns to, leaving the ABI's alignment
  for (int i = 0; i < 6; ++i) *--top = nullptr;  // rbp, rbx, r12..r15
  context.sp = top;
}
void jump(Context& from, Context& to) { vkernels_emulation_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void prepare(Context& context, char* stack, size_t size, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = size;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}
void jump(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

#ifdef VKERNELS_EMULATION_ASAN
constexpr size_t kStackBytes = 512 * 1024;  // instrumented frames are several times larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
constexpr size_t kGuardBytes = 4096;  // below each stack: an overflow faults instead of corrupting

// Fiber stacks, mapped once per host thread and reused by every launch.
class StackPool {
 public:
  ~StackPool() {
    for (char* base : maps_) munmap(base, kStackBytes + kGuardBytes);
  }
  char* get(size_t i) {
    while (maps_.size() <= i) {
      void* base = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      TORCH_CHECK(base != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
      mprotect(base, kGuardBytes, PROT_NONE);
      maps_.push_back(static_cast<char*>(base));
    }
    return maps_[i] + kGuardBytes;
  }

 private:
  std::vector<char*> maps_;
};

// ---------------------------------------------------------------------------------------------
// Kernel names for error messages: the symbol table of the library holding the kernel (kernels
// have internal linkage, so dladdr alone does not name them).
// ---------------------------------------------------------------------------------------------

std::string demangle(const char* name) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> text(abi::__cxa_demangle(name, nullptr, nullptr, &status), std::free);
  return status == 0 && text ? std::string(text.get()) : std::string(name);
}

std::string symbol_in_file(const char* path, uintptr_t offset) {
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  struct stat st {};
  std::string found;
  if (fstat(fd, &st) == 0 && st.st_size > static_cast<off_t>(sizeof(Elf64_Ehdr))) {
    void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const auto* base = static_cast<const unsigned char*>(map);
      const auto* header = reinterpret_cast<const Elf64_Ehdr*>(base);
      const bool elf64 = std::memcmp(header->e_ident, ELFMAG, SELFMAG) == 0 && header->e_ident[EI_CLASS] == ELFCLASS64;
      if (elf64 && header->e_shoff + size_t{header->e_shnum} * sizeof(Elf64_Shdr) <= size_t(st.st_size)) {
        const auto* sections = reinterpret_cast<const Elf64_Shdr*>(base + header->e_shoff);
        for (int s = 0; s < header->e_shnum && found.empty(); ++s) {
          if (sections[s].sh_type != SHT_SYMTAB || sections[s].sh_link >= header->e_shnum) continue;
          const auto* symbols = reinterpret_cast<const Elf64_Sym*>(base + sections[s].sh_offset);
          const char* names = reinterpret_cast<const char*>(base + sections[sections[s].sh_link].sh_offset);
          for (size_t i = 0; i < sections[s].sh_size / sizeof(Elf64_Sym); ++i) {
            if (ELF64_ST_TYPE(symbols[i].st_info) == STT_FUNC && symbols[i].st_value == offset) {
              found = demangle(names + symbols[i].st_name);
              break;
            }
          }
        }
      }
      munmap(map, st.st_size);
    }
  }
  close(fd);
  return found;
}

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) != 0) {
    if (info.dli_sname != nullptr && info.dli_saddr == kernel) return demangle(info.dli_sname);
    if (info.dli_fname != nullptr) {
      std::string name = symbol_in_file(info.dli_fname, reinterpret_cast<uintptr_t>(kernel) -
                                                            reinterpret_cast<uintptr_t>(info.dli_fbase));
      if (!name.empty()) return name;
    }
  }
  std::ostringstream unknown;
  unknown << "kernel at " << kernel;
  return unknown.str();
}

// ---------------------------------------------------------------------------------------------
// Fibers and blocks
// ---------------------------------------------------------------------------------------------

std::string describe(uint3 v) {
  std::ostringstream text;
  text << "(" << v.x << ", " << v.y << ", " << v.z << ")";
  return text.str();
}
std::string describe(dim3 v) { return describe(uint3{v.x, v.y, v.z}); }
std::string describe(const Site& site) {
  const char* slash = std::strrchr(site.file, '/');
  return std::string(slash ? slash + 1 : site.file) + ":" + std::to_string(site.line);
}
std::string hex(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", mask);
  return text;
}

const char* collective_name(Collective op) {
  switch (op) {
    case Collective::kSyncwarp: return "__syncwarp";
    case Collective::kShuffleIndex: return "__shfl_sync";
    case Collective::kShuffleUp: return "__shfl_up_sync";
    case Collective::kShuffleDown: return "__shfl_down_sync";
    case Collective::kShuffleXor: return "__shfl_xor_sync";
    case Collective::kBallot: return "__ballot_sync";
    case Collective::kLdmatrix: return "ldmatrix.x4";
    case Collective::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case Collective::kMmaF16: return "mma.sync.m16n8k16.f16";
    case Collective::kMmaBf16: return "mma.sync.m16n8k16.bf16";
  }
  return "collective";
}

// An error found while a thread runs: the launch stops and reports it for that thread.
struct ThreadFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State : uint8_t { kReady, kBarrier, kCollective, kExited };

struct PendingCopy {
  unsigned char* dst;
  int bytes;
  unsigned char data[16];
};

struct Fiber {
  Context context;
  char* stack = nullptr;
  uint3 index{};
  int rank = 0;  // linear thread index: x fastest, as CUDA forms warps
  State state = State::kReady;
  Site site{};
  Collective op{};
  unsigned mask = 0;
  LaneData* data = nullptr;
  std::vector<PendingCopy> copies;  // issued cp.async writes; the first `committed` are committed
  size_t committed = 0;
#ifdef VKERNELS_EMULATION_ASAN
  void* fake_stack = nullptr;
#endif
};

struct WarpState {
  unsigned present = 0;  // lanes the block has
  unsigned exited = 0;
  unsigned waiting = 0;  // lanes waiting at a collective
};

struct SharedArray {
  const void* key;  // nullptr: the dynamic array
  const char* name;
  unsigned char* data;
  size_t bytes, alignment;
};

struct LaunchSpec {
  const void* kernel;
  dim3 grid, block;
  size_t dynamic_bytes;
  void (*body)(const void*);
  const void* closure;
};

constexpr size_t kMaxSharedArrays = 255;  // shared addresses keep the array index in their top 8 bits
constexpr uint32_t kOffsetBits = 24;

class Block;
thread_local Block* t_block = nullptr;

class Block {
 public:
  Block(const LaunchSpec& launch, std::vector<Fiber>& fibers, StackPool& stacks, std::optional<uint64_t> random_seed)
      : launch_(launch), fibers_(fibers), threads_(static_cast<int>(fibers.size())) {
    if (random_seed) {
      random_ = true;
      random_state_ = *random_seed;
    }
    for (int i = 0; i < threads_; ++i) {
      Fiber& f = fibers_[i];
      f.rank = i;
      f.index = {i % launch.block.x, i / launch.block.x % launch.block.y, i / (launch.block.x * launch.block.y)};
      f.stack = stacks.get(i);
    }
    ready_.resize(threads_);
#ifdef VKERNELS_EMULATION_ASAN
    // a previous launch that stopped on an error left frames (and their redzones) on these stacks
    for (Fiber& f : fibers_) ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
  }

  ~Block() { release_shared(); }

  // Runs every thread of block `index` to its end; throws c10::Error on a fault.
  void run(uint3 index) {
    blockIdx = index;
    index_ = index;
    barrier_waiting_ = 0;
    for (int w = 0; w < (threads_ + 31) / 32; ++w) {
      const int lanes = std::min(32, threads_ - 32 * w);
      warps_[w] = {lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u, 0u, 0u};
    }
    for (Fiber& f : fibers_) {
      f.state = State::kReady;
      f.copies.clear();
      f.committed = 0;
      prepare(f.context, f.stack, kStackBytes, &fiber_main);
    }
    head_ = 0;
    count_ = 0;
    for (int i = 0; i < threads_; ++i) push(i);
    release_shared();
    dynamic_ = allocate_shared(nullptr, "dynamic shared memory", launch_.dynamic_bytes, 128);

    t_block = this;
    // Threads hand over to each other (switch_away); the scheduler gets control back when no
    // thread can run, so this loop runs once unless a launch failed.
    while (count_ > 0 && !error_) {
      current_ = &fibers_[pop()];
      threadIdx = current_->index;
#ifdef VKERNELS_EMULATION_ASAN
      from_scheduler_ = true;
      __sanitizer_start_switch_fiber(&scheduler_fake_stack_, current_->stack, kStackBytes);
#endif
      jump(scheduler_, current_->context);
#ifdef VKERNELS_EMULATION_ASAN
      __sanitizer_finish_switch_fiber(scheduler_fake_stack_, nullptr, nullptr);
#endif
    }
    t_block = nullptr;
    release_shared();
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    check_all_exited();
  }

  // --- called by the running thread ---

  Fiber& current() { return *current_; }

  void barrier(Site site) {
    Fiber& f = current();
    f.state = State::kBarrier;
    f.site = site;
    if (++barrier_waiting_ < threads_) {
      yield();
      return;
    }
    for (const Fiber& other : fibers_) {
      if (!same_site(other.site, site)) {
        fault("threads of the block wait at different __syncthreads: this thread at " + describe(site) +
              ", thread " + describe(other.index) + " at " + describe(other.site));
      }
    }
    barrier_waiting_ = 0;
    for (Fiber& other : fibers_) {
      other.state = State::kReady;
      if (&other != &f) push(other.rank);
    }
  }

  void collective(Collective op, unsigned mask, LaneData& data, Site site) {
    Fiber& f = current();
    const int lane = f.rank % 32;
    WarpState& warp = warps_[f.rank / 32];
    auto call = [&] { return std::string(collective_name(op)) + " (mask " + hex(mask) + ") at " + describe(site); };
    if (!(mask >> lane & 1u)) fault(call() + " leaves out the calling lane " + std::to_string(lane));
    if (mask & ~warp.present) {
      fault(call() + " names lane " + std::to_string(__builtin_ctz(mask & ~warp.present)) + ", which this block of " +
            describe(launch_.block) + " threads does not have");
    }
    if (mask & warp.exited) {
      fault(call() + " waits for lane " + std::to_string(__builtin_ctz(mask & warp.exited)) + ", which has exited");
    }
    // Overlapping masks must be equal. The lanes already waiting in this mask agree among themselves
    // (each was checked on arrival), so the first of them speaks for all; lanes outside it are checked
    // one by one (none for full-warp collectives).
    const unsigned inside = warp.waiting & mask;
    for (unsigned others = (warp.waiting & ~mask) | (inside & -inside); others != 0; others &= others - 1) {
      const Fiber& other = fibers_[f.rank - lane + __builtin_ctz(others)];
      if ((other.mask & mask) != 0 && (other.mask != mask || other.op != op)) {
        fault("lanes disagree: lane " + std::to_string(lane) + " calls " + call() + ", lane " +
              std::to_string(other.rank % 32) + " waits in " + collective_name(other.op) + " (mask " +
              hex(other.mask) + ") at " + describe(other.site));
      }
    }
    f.state = State::kCollective;
    f.op = op;
    f.mask = mask;
    f.data = &data;
    f.site = site;
    warp.waiting |= 1u << lane;
    if ((warp.waiting & mask) != mask) {
      yield();
      return;
    }
    execute(op, mask, f.rank - lane);
    warp.waiting &= ~mask;
    for (unsigned lanes = mask; lanes != 0; lanes &= lanes - 1) {
      Fiber& member = fibers_[f.rank - lane + __builtin_ctz(lanes)];
      member.state = State::kReady;
      if (&member != &f) push(member.rank);
    }
  }

  void* static_shared(const void* key, size_t bytes, size_t alignment, const char* name) {
    for (const SharedArray& array : shared_) {
      if (array.key == key) return array.data;
    }
    size_t static_bytes = bytes;
    for (const SharedArray& array : shared_) static_bytes += array.key ? array.bytes : 0;
    if (static_bytes > size_t(kSharedPerBlockDefault)) {
      fault("static shared memory reaches " + std::to_string(static_bytes) + " bytes with `" + name +
            "`; a kernel may declare at most " + std::to_string(kSharedPerBlockDefault));
    }
    if (static_bytes + launch_.dynamic_bytes > size_t(kSharedPerBlockOptin)) {
      fault("static (" + std::to_string(static_bytes) + " bytes) and dynamic (" +
            std::to_string(launch_.dynamic_bytes) + " bytes) shared memory exceed the " +
            std::to_string(kSharedPerBlockOptin) + " bytes a block may have");
    }
    return allocate_shared(key, name, bytes, std::max<size_t>(alignment, 16));
  }

  unsigned char* dynamic_shared() { return dynamic_; }

  uint32_t shared_address(const void* pointer) {
    const auto* p = static_cast<const unsigned char*>(pointer);
    for (size_t i = 0; i < shared_.size(); ++i) {
      if (p >= shared_[i].data && p <= shared_[i].data + shared_[i].bytes) {
        return static_cast<uint32_t>((i + 1) << kOffsetBits | static_cast<size_t>(p - shared_[i].data));
      }
    }
    fault("__cvta_generic_to_shared of a pointer that is not in the block's shared memory");
  }

  void* shared_pointer(uint32_t address, size_t bytes, size_t alignment, const char* what) {
    const size_t index = (address >> kOffsetBits) - 1, offset = address & ((1u << kOffsetBits) - 1);
    if (index >= shared_.size()) fault(std::string(what) + " at a shared address " + hex(address) + " outside every shared array");
    const SharedArray& array = shared_[index];
    if (offset + bytes > array.bytes) {
      fault(std::string(what) + " reads or writes bytes " + std::to_string(offset) + ".." +
            std::to_string(offset + bytes - 1) + " of `" + array.name + "`, which has " + std::to_string(array.bytes));
    }
    if (offset % alignment != 0) {
      fault(std::string(what) + " at byte " + std::to_string(offset) + " of `" + array.name + "` is not " +
            std::to_string(alignment) + "-byte aligned");
    }
    return array.data + offset;
  }

  [[noreturn]] void fault(const std::string& message) { throw ThreadFault(message); }

  // A thread's copies land in shared memory in issue order.
  static void land(Fiber& f, size_t count) {
    for (size_t i = 0; i < count; ++i) std::memcpy(f.copies[i].dst, f.copies[i].data, f.copies[i].bytes);
    f.copies.erase(f.copies.begin(), f.copies.begin() + count);
  }

 private:
  [[noreturn]] static void fiber_main() {
    Block& block = *t_block;
#ifdef VKERNELS_EMULATION_ASAN
    const void* from_stack = nullptr;
    size_t from_size = 0;
    __sanitizer_finish_switch_fiber(nullptr, &from_stack, &from_size);
    if (block.from_scheduler_) {  // the host thread's own stack, where the last thread returns to
      block.scheduler_stack_ = from_stack;
      block.scheduler_stack_size_ = from_size;
    }
#endif
    try {
      block.launch_.body(block.launch_.closure);
    } catch (const ThreadFault& fault) {
      block.fail(fault.what());
    } catch (const c10::Error& error) {
      block.fail(error.what_without_backtrace());
    } catch (const std::exception& error) {
      block.fail(error.what());
    }
    block.exit_thread();
  }

  [[noreturn]] void exit_thread() {
    Fiber& f = current();
    land(f, f.copies.size());  // copies still in flight land when they land: at the latest, now
    f.state = State::kExited;
    warps_[f.rank / 32].exited |= 1u << (f.rank % 32);
    switch_away(f, true);
    __builtin_unreachable();
  }

  void yield() { switch_away(current(), false); }

  // Leaves thread f (blocked, or finished for good) for the next runnable thread, or for the
  // scheduler when none is left or the launch failed: threads hand over to each other directly.
  void switch_away(Fiber& f, bool finished) {
    Context* target = &scheduler_;
#ifdef VKERNELS_EMULATION_ASAN
    const void* stack = scheduler_stack_;
    size_t stack_size = scheduler_stack_size_;
#endif
    if (count_ > 0 && !error_) {
      current_ = &fibers_[pop()];
      threadIdx = current_->index;
      target = &current_->context;
#ifdef VKERNELS_EMULATION_ASAN
      stack = current_->stack;
      stack_size = kStackBytes;
#endif
    }
#ifdef VKERNELS_EMULATION_ASAN
    from_scheduler_ = false;
    __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, stack, stack_size);
#endif
    jump(f.context, *target);
#ifdef VKERNELS_EMULATION_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  }

  void push(int rank) {
    ready_[(head_ + count_) % threads_] = rank;
    ++count_;
  }
  int pop() {
    if (random_) {  // draw one of the runnable threads: swap it to the head
      std::swap(ready_[head_], ready_[(head_ + next_random() % count_) % threads_]);
    }
    const int rank = ready_[head_];
    head_ = (head_ + 1) % threads_;
    --count_;
    return rank;
  }

  static bool same_site(const Site& a, const Site& b) {
    return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
  }

  std::string where(const Fiber& f) const {
    return "block " + describe(index_) + ", thread " + describe(f.index) + " (warp " + std::to_string(f.rank / 32) +
           ", lane " + std::to_string(f.rank % 32) + ")";
  }

  void fail(const std::string& message) {
    if (!error_) error_ = launch_error(where(current()) + ": " + message);
  }

  std::exception_ptr launch_error(const std::string& message) const {
    std::ostringstream text;
    text << "CUDA emulation: " << kernel_name(launch_.kernel) << " <<<grid " << describe(launch_.grid) << ", block "
         << describe(launch_.block) << ", " << launch_.dynamic_bytes << " bytes of dynamic shared memory>>>: "
         << message;
    try {
      TORCH_CHECK(false, text.str());
    } catch (...) {
      return std::current_exception();
    }
    return nullptr;
  }

  // No thread can run: every one has exited, or the ones left wait for threads that never come.
  void check_all_exited() {
    const Fiber* waiting = nullptr;
    for (const Fiber& f : fibers_) {
      if (f.state == State::kCollective) {
        waiting = &f;
        break;
      }
      if (f.state == State::kBarrier && waiting == nullptr) waiting = &f;
    }
    if (waiting == nullptr) return;
    std::string message;
    if (waiting->state == State::kCollective) {
      const int first = waiting->rank - waiting->rank % 32;
      const WarpState& warp = warps_[waiting->rank / 32];
      const unsigned absent = waiting->mask & ~warp.waiting;
      const Fiber& other = fibers_[first + __builtin_ctz(absent)];
      message = std::string(collective_name(waiting->op)) + " (mask " + hex(waiting->mask) + ") at " +
                describe(waiting->site) + " waits for lane " + std::to_string(other.rank % 32) + ", which ";
      if (other.state == State::kExited) {
        message += "has exited";
      } else if (other.state == State::kBarrier) {
        message += "waits at __syncthreads at " + describe(other.site);
      } else {
        message += "waits in " + std::string(collective_name(other.op)) + " (mask " + hex(other.mask) + ") at " +
                   describe(other.site);
      }
    } else {
      const Fiber* gone = nullptr;
      for (const Fiber& f : fibers_) {
        if (f.state == State::kExited) gone = gone ? gone : &f;
      }
      message = "__syncthreads at " + describe(waiting->site) + " is never reached by thread " +
                (gone ? describe(gone->index) + ", which has exited" : std::string("every thread of the block"));
    }
    std::rethrow_exception(launch_error(where(*waiting) + ": " + message));
  }

  unsigned char* allocate_shared(const void* key, const char* name, size_t bytes, size_t alignment) {
    if (shared_.size() == kMaxSharedArrays) fault("more than 255 shared arrays in one block");
    // exactly `bytes`: one byte past the end is an AddressSanitizer error, not the next array
    auto* data = static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(alignment)));
    std::memset(data, 0xff, bytes);  // NaN in every float type: reads of unwritten shared memory show
    shared_.push_back({key, name, data, bytes, alignment});
    return data;
  }

  void release_shared() {
    for (const SharedArray& array : shared_) ::operator delete(array.data, std::align_val_t(array.alignment));
    shared_.clear();
    dynamic_ = nullptr;
  }

  const LaunchSpec& launch_;
  std::vector<Fiber>& fibers_;
  const int threads_;
  uint3 index_{};
  WarpState warps_[32];
  int barrier_waiting_ = 0;
  std::vector<int> ready_;
  int head_ = 0, count_ = 0;
  bool random_ = false;
  uint64_t random_state_ = 0;
  uint64_t next_random() {  // splitmix64
    uint64_t z = (random_state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  std::vector<SharedArray> shared_;
  unsigned char* dynamic_ = nullptr;
  Fiber* current_ = nullptr;
  Context scheduler_;
  std::exception_ptr error_;
#ifdef VKERNELS_EMULATION_ASAN
  void* scheduler_fake_stack_ = nullptr;
  bool from_scheduler_ = false;
  const void* scheduler_stack_ = nullptr;
  size_t scheduler_stack_size_ = 0;
#endif

  void execute(Collective op, unsigned mask, int first_rank);
};

// ---------------------------------------------------------------------------------------------
// The collectives, computed by the last lane to arrive for every lane of the mask
// ---------------------------------------------------------------------------------------------

// shfl.sync's source lane (PTX ISA): lanes form segments of `width`; a source outside the lane's
// segment bound (below it for .up, above it otherwise) reads the lane's own value.
int shuffle_source(Collective op, int lane, int arg, int width) {
  const int segment = (32 - width) & 31;  // the c[12:8] field CUDA passes
  const int clamp = op == Collective::kShuffleUp ? 0 : 31;
  const int max_lane = (lane & segment) | (clamp & ~segment), min_lane = lane & segment;
  const int b = arg & 31;
  int source = lane;
  bool inside = true;
  switch (op) {
    case Collective::kShuffleIndex: source = min_lane | (b & ~segment); inside = source <= max_lane; break;
    case Collective::kShuffleUp: source = lane - b; inside = source >= max_lane; break;
    case Collective::kShuffleDown: source = lane + b; inside = source <= max_lane; break;
    default: source = lane ^ b; inside = source <= max_lane; break;
  }
  return inside ? source : lane;
}

void Block::execute(Collective op, unsigned mask, int first_rank) {
  LaneData* lanes[32] = {};
  for (unsigned m = mask; m != 0; m &= m - 1) lanes[__builtin_ctz(m)] = fibers_[first_rank + __builtin_ctz(m)].data;
  switch (op) {
    case Collective::kSyncwarp:
      return;
    case Collective::kBallot: {
      uint32_t ballot = 0;
      for (unsigned m = mask; m != 0; m &= m - 1) ballot |= (lanes[__builtin_ctz(m)]->word[0] & 1u) << __builtin_ctz(m);
      for (unsigned m = mask; m != 0; m &= m - 1) lanes[__builtin_ctz(m)]->word[0] = ballot;
      return;
    }
    case Collective::kShuffleIndex:
    case Collective::kShuffleUp:
    case Collective::kShuffleDown:
    case Collective::kShuffleXor: {
      uint32_t result[32];
      for (unsigned m = mask; m != 0; m &= m - 1) {
        const int lane = __builtin_ctz(m);
        const int width = static_cast<int>(lanes[lane]->word[2]);
        if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
          fault(std::string(collective_name(op)) + ": lane " + std::to_string(lane) + " passes width " +
                std::to_string(width) + ", not a power of 2 up to 32");
        }
        const int source = shuffle_source(op, lane, static_cast<int>(lanes[lane]->word[1]), width);
        if (!(mask >> source & 1u)) {
          fault(std::string(collective_name(op)) + " (mask " + hex(mask) + "): lane " + std::to_string(lane) +
                " reads lane " + std::to_string(source) + ", which is not in the mask");
        }
        result[lane] = lanes[source]->word[0];
      }
      for (unsigned m = mask; m != 0; m &= m - 1) lanes[__builtin_ctz(m)]->word[0] = result[__builtin_ctz(m)];
      return;
    }
    case Collective::kLdmatrix:
    case Collective::kLdmatrixTrans: {
      // Matrix i's row r is the 16 bytes at lane 8i + r's address. Lane L receives in register i row
      // L/4, columns 2(L%4) and 2(L%4)+1 (.trans: column L/4, rows 2(L%4) and 2(L%4)+1), low half first.
      uint16_t rows[4][8][8];
      for (int lane = 0; lane < 32; ++lane) {
        const void* row = shared_pointer(lanes[lane]->word[0], 16, 16, collective_name(op));
        std::memcpy(rows[lane / 8][lane % 8], row, 16);
      }
      const bool trans = op == Collective::kLdmatrixTrans;
      for (int lane = 0; lane < 32; ++lane) {
        const int r = lane / 4, c = 2 * (lane % 4);
        for (int i = 0; i < 4; ++i) {
          const uint16_t lo = trans ? rows[i][c][r] : rows[i][r][c];
          const uint16_t hi = trans ? rows[i][c + 1][r] : rows[i][r][c + 1];
          lanes[lane]->word[i] = uint32_t{lo} | uint32_t{hi} << 16;
        }
      }
      return;
    }
    case Collective::kMmaF16:
    case Collective::kMmaBf16: {
      // Fragments (PTX ISA, m16n8k16 .f16/.bf16; g = lane / 4, t = lane % 4; low half = lower index):
      //   A registers 0..3: (g, 2t..), (g+8, 2t..), (g, 8+2t..), (g+8, 8+2t..)
      //   B registers 0, 1: (k = 2t.., n = g), (k = 8+2t.., n = g)
      //   C, D: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
      const bool f16 = op == Collective::kMmaF16;
      auto value = [f16](uint32_t word, int half) {
        const auto bits = static_cast<uint16_t>(word >> (16 * half));
        return static_cast<double>(f16 ? half_bits_to_float(bits) : bfloat16_bits_to_float(bits));
      };
      double a[16][16], b[16][8], c[16][8];
      for (int lane = 0; lane < 32; ++lane) {
        const uint32_t* w = lanes[lane]->word;
        const int g = lane / 4, t = lane % 4;
        for (int e = 0; e < 2; ++e) {
          a[g][2 * t + e] = value(w[0], e);
          a[g + 8][2 * t + e] = value(w[1], e);
          a[g][8 + 2 * t + e] = value(w[2], e);
          a[g + 8][8 + 2 * t + e] = value(w[3], e);
          b[2 * t + e][g] = value(w[4], e);
          b[8 + 2 * t + e][g] = value(w[5], e);
          c[g][2 * t + e] = bits_float(w[6 + e]);
          c[g + 8][2 * t + e] = bits_float(w[8 + e]);
        }
      }
      // fp16 and bf16 products are exact in double; each sum runs over k in order (a row of 8 sums
      // at a time, which vectorises) and is rounded once, to float
      float d[16][8];
      for (int m = 0; m < 16; ++m) {
        double sum[8];
        for (int n = 0; n < 8; ++n) sum[n] = c[m][n];
        for (int k = 0; k < 16; ++k) {
          for (int n = 0; n < 8; ++n) sum[n] += a[m][k] * b[k][n];
        }
        for (int n = 0; n < 8; ++n) d[m][n] = static_cast<float>(sum[n]);
      }
      for (int lane = 0; lane < 32; ++lane) {
        uint32_t* w = lanes[lane]->word;
        const int g = lane / 4, t = lane % 4;
        for (int e = 0; e < 2; ++e) {
          w[e] = float_bits(d[g][2 * t + e]);
          w[2 + e] = float_bits(d[g + 8][2 * t + e]);
        }
      }
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------------------

std::mutex g_attributes_mutex;
std::unordered_map<const void*, int> g_max_dynamic_shared;  // cudaFuncSetAttribute's values

// VKERNELS_EMULATION_SCHEDULE=random (or set_schedule): the next thread to run is drawn at random
// from the runnable ones instead of taken in order, seeded per launch, so a result that depends on
// the order of threads between two synchronisations (a race on a GPU) changes from run to run.
struct Schedule {
  bool random;
  uint64_t seed;
};
Schedule initial_schedule() {
  const char* name = std::getenv("VKERNELS_EMULATION_SCHEDULE");
  const char* seed = std::getenv("VKERNELS_EMULATION_SEED");
  return {name != nullptr && std::strcmp(name, "random") == 0, seed ? std::strtoull(seed, nullptr, 10) : 0};
}
Schedule g_schedule = initial_schedule();  // guarded by g_attributes_mutex
uint64_t g_launches = 0;

std::optional<uint64_t> launch_seed() {
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  ++g_launches;
  if (!g_schedule.random) return std::nullopt;
  return g_schedule.seed * 0x100000001b3ull + g_launches;
}

int max_dynamic_shared(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  const auto it = g_max_dynamic_shared.find(kernel);
  return it == g_max_dynamic_shared.end() ? kSharedPerBlockDefault : it->second;
}

Block& running_block() {
  TORCH_CHECK(t_block != nullptr, "CUDA emulation: a device function was called outside a kernel launch");
  return *t_block;
}

}  // namespace

void set_schedule(const std::string& name, uint64_t seed) {
  TORCH_CHECK(name == "fifo" || name == "random", "CUDA emulation: schedule must be 'fifo' or 'random', got ", name);
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  g_schedule = {name == "random", seed};
}

std::pair<std::string, uint64_t> schedule() {
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  return {g_schedule.random ? "random" : "fifo", g_schedule.seed};
}

void set_max_dynamic_shared(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  g_max_dynamic_shared[kernel] = bytes;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*body)(const void*),
              const void* closure) {
  const LaunchSpec launch{kernel, grid, block, dynamic_shared_bytes, body, closure};
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  auto refuse = [&](const std::string& why) {
    TORCH_CHECK(false, "CUDA emulation: ", kernel_name(kernel), " <<<grid ", describe(grid), ", block ",
                describe(block), ", ", dynamic_shared_bytes, " bytes of dynamic shared memory>>> fails to launch: ",
                why);
  };
  if (threads == 0 || threads > 1024 || block.z > 64) refuse("a block has 1 to 1024 threads, at most 64 along z");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    refuse("the grid must be non-empty, with x < 2^31 and y, z <= 65535");
  }
  const int limit = max_dynamic_shared(kernel);
  if (dynamic_shared_bytes > size_t(limit)) {
    refuse("more than the " + std::to_string(limit) +
           " bytes of dynamic shared memory allowed (above 48 KiB, set cudaFuncAttributeMaxDynamicSharedMemorySize)");
  }
  thread_local StackPool stacks;
  thread_local std::vector<Fiber> fibers;
  fibers.resize(threads);
  blockDim = block;
  gridDim = grid;
  Block runner(launch, fibers, stacks, launch_seed());
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) runner.run({x, y, z});
    }
  }
}

void sync_threads(Site site) { running_block().barrier(site); }

void warp_collective(Collective op, unsigned mask, LaneData& data, Site site) {
  running_block().collective(op, mask, data, site);
}

void* static_shared(const void* key, size_t bytes, size_t alignment, const char* name) {
  return running_block().static_shared(key, bytes, alignment, name);
}

unsigned char* dynamic_shared() { return running_block().dynamic_shared(); }

uint32_t shared_address(const void* pointer) { return running_block().shared_address(pointer); }

void* shared_pointer(uint32_t address, size_t bytes, size_t alignment, const char* what) {
  return running_block().shared_pointer(address, bytes, alignment, what);
}

void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes) {
  Block& block = running_block();
  if (bytes != 4 && bytes != 8 && bytes != 16) block.fault("cp.async copies 4, 8 or 16 bytes");
  if (src_bytes < 0 || src_bytes > bytes) block.fault("cp.async: the source size must be in [0, copy size]");
  PendingCopy copy{static_cast<unsigned char*>(block.shared_pointer(dst, bytes, bytes, "cp.async")), bytes, {}};
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(src) % bytes != 0) {
      block.fault("cp.async of " + std::to_string(bytes) + " bytes from a source that is not " +
                  std::to_string(bytes) + "-byte aligned");
    }
    std::memcpy(copy.data, src, src_bytes);  // the global read happens at issue
  }
  block.current().copies.push_back(copy);
}

void cp_async_commit() {
  Fiber& f = running_block().current();
  f.committed = f.copies.size();
}

void cp_async_wait_all() {
  Fiber& f = running_block().current();
  Block::land(f, f.committed);
  f.committed = 0;
}

}  // namespace vkernels::emulation
