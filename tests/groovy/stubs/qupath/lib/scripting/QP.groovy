package qupath.lib.scripting

import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer
import qupath.lib.objects.PathObject
import qupath.lib.objects.classes.PathClass
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import standin.ImageState

/**
 * STAND-IN for QuPath's QP scripting class (not QuPath). QuPath makes these static methods
 * available to every script (a static import of QP, or of QPEx which extends it); the tests'
 * launcher adds {@code import static qupath.lib.scripting.QP.*} the same way.
 *
 * Signatures are those of QuPath 0.4-0.7. The current image comes from {@link ImageState}.
 */
class QP {

    static ImageServer<?> getCurrentServer() { return ImageState.get().server() }

    /** QuPath: the image the script runs on (null when none is open). */
    static ImageData<?> getCurrentImageData() { return ImageState.get().imageData() }

    static PathObjectHierarchy getCurrentHierarchy() {
        ImageData<?> data = getCurrentImageData()
        return data == null ? null : data.getHierarchy()
    }

    /** QuPath: declared as a Collection (an ArrayList in 0.4-0.7). */
    static Collection<PathObject> getAnnotationObjects() {
        return new ArrayList<PathObject>(ImageState.get().objects.findAll { it.isAnnotation() })
    }

    static Collection<PathObject> getDetectionObjects() {
        return new ArrayList<PathObject>(ImageState.get().objects.findAll { it.isDetection() })
    }

    /** QuPath: the selection model's unmodifiable Set (not a List). */
    static Collection<PathObject> getSelectedObjects() {
        return Collections.unmodifiableSet(new LinkedHashSet<PathObject>(ImageState.get().selected()))
    }

    static PathClass getPathClass(String name) { return name == null ? null : PathClass.fromString(name) }

    static void addObject(PathObject pathObject) { addObjects([pathObject]) }

    static void addObjects(PathObject[] pathObjects) { addObjects(Arrays.asList(pathObjects)) }

    static void addObjects(Collection<PathObject> pathObjects) { ImageState.get().add(pathObjects) }

    static void removeObject(PathObject pathObject, boolean keepChildren) { removeObjects([pathObject], keepChildren) }

    static void removeObjects(PathObject[] pathObjects, boolean keepChildren) {
        removeObjects(Arrays.asList(pathObjects), keepChildren)
    }

    static void removeObjects(Collection<? extends PathObject> pathObjects, boolean keepChildren) {
        ImageState.get().remove(pathObjects)
    }

    /** QuPath: tells the viewers and measurement tables that objects changed. The stand-in saves the record. */
    static void fireHierarchyUpdate() { ImageState.get().save() }
}
